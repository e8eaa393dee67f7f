//! Predicates: which updates of a cached object call for a reconcile.
//!
//! As kube-runtime's `predicates`: a trigger drops updates that change nothing its
//! reconciler reads — a status written by another writer, or the reconciler's own status
//! write coming back through the watch. Appearing and vanishing objects always pass.

use std::sync::Arc;

/// Whether the update from the first object to the second calls for a reconcile.
pub type Predicate<T> = Arc<dyn Fn(&T, &T) -> bool + Send + Sync>;

/// Every update passes.
pub fn any<T>() -> Predicate<T> {
    Arc::new(|_, _| true)
}

/// An update passes when the part of the object `project` picks out changed.
pub fn changed<T, P: PartialEq>(project: impl Fn(&T) -> P + Send + Sync + 'static) -> Predicate<T> {
    Arc::new(move |old, new| project(old) != project(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projection_ignores_what_it_leaves_out() {
        let name_only = changed(|pair: &(&str, u32)| pair.0.to_owned());
        assert!(!name_only(&("a", 1), &("a", 2)));
        assert!(name_only(&("a", 1), &("b", 1)));
        assert!(any()(&("a", 1), &("a", 1)));
    }
}
