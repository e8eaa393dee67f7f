//! One answer for every reference by name.
//!
//! ARCHITECTURE.md's rule, in one place: a name resolves in the referring object's own
//! project first, then among the objects other projects share (shared or external
//! Networks, public Images), and a cluster-scoped kind (Flavor) by its name alone. A public
//! name held in several other projects is ambiguous: no candidate is picked, and the
//! answer names them all, because picking one (say, the first by project) would attach a
//! server to a network its owner never meant it to use the moment someone else published
//! a network of the same name.
//!
//! [`resolve`] is pure and works over whatever source of candidates the caller has: the
//! controllers pass what their caches index under the name, the agent what a List call
//! returned. A failure is an [`Unresolved`], whose [`reason`](Unresolved::reason) and
//! message are what a condition says (`NetworkNotFound`, `ImageAmbiguous`, …).

use std::ops::Deref;

use crate::{Kind, Resource, kinds::Scope, v1};

/// A kind a reference by name may point at, and whether one of its objects may be
/// referenced from other projects.
pub trait Referable: Resource {
    /// Whether this object resolves for references from other projects too.
    fn is_public(&self) -> bool {
        false
    }
}

impl Referable for v1::Network {
    fn is_public(&self) -> bool {
        self.spec
            .as_ref()
            .is_some_and(|s| s.shared == Some(true) || s.external == Some(true))
    }
}

impl Referable for v1::Image {
    fn is_public(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.visibility)
            == Some(v1::image_spec::Visibility::Public as i32)
    }
}

impl Referable for v1::Flavor {}
impl Referable for v1::KeyPair {}
impl Referable for v1::SecurityGroup {}
impl Referable for v1::ServerGroup {}
impl Referable for v1::Volume {}
impl Referable for v1::Port {}

/// What other projects' objects of `kind` a name may resolve to, in words; `None` for
/// kinds that never resolve outside their project.
fn shared_among(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Network => Some("shared networks"),
        Kind::Image => Some("public images"),
        _ => None,
    }
}

/// Where a reference was looked for, as the end of a "not found" message.
fn searched(kind: Kind, project: &str) -> String {
    match (kind.scope(), shared_among(kind)) {
        (Scope::Cluster, _) => String::new(),
        (Scope::Project, None) => format!(" in project {project}"),
        (Scope::Project, Some(shared)) => format!(" in project {project} or among {shared}"),
    }
}

/// One of several objects an ambiguous name could mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The project holding it.
    pub project: String,
    /// Its uid.
    pub uid: String,
}

/// A reference that resolves to no object, or to several.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// Nothing of that name where the reference may look.
    #[error("{} {name} not found{}", kind.name(), searched(*kind, project))]
    NotFound {
        /// The kind referenced.
        kind: Kind,
        /// The name referenced.
        name: String,
        /// The referring object's project, looked in first.
        project: String,
    },
    /// Nothing of that name in the referring project, and several public ones elsewhere.
    #[error(
        "{} {name} is ambiguous: {} of that name exist in projects {}",
        kind.name(),
        shared_among(*kind).unwrap_or("objects"),
        candidates.iter().map(|c| c.project.as_str()).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous {
        /// The kind referenced.
        kind: Kind,
        /// The name referenced.
        name: String,
        /// Every object the name could mean, by project.
        candidates: Vec<Candidate>,
    },
}

impl Unresolved {
    /// The condition reason: `<Kind>NotFound` or `<Kind>Ambiguous`.
    pub fn reason(&self) -> String {
        match self {
            Unresolved::NotFound { kind, .. } => format!("{}NotFound", kind.name()),
            Unresolved::Ambiguous { kind, .. } => format!("{}Ambiguous", kind.name()),
        }
    }

    /// Whether the name could mean the object with this uid: it is one of the candidates of
    /// an ambiguous name. A resolution recorded before the name became ambiguous stands.
    pub fn could_mean(&self, uid: &str) -> bool {
        match self {
            Unresolved::NotFound { .. } => false,
            Unresolved::Ambiguous { candidates, .. } => candidates.iter().any(|c| c.uid == uid),
        }
    }
}

fn meta<T: Resource>(object: &T) -> (&str, &str, &str) {
    object.metadata().map_or(("", "", ""), |m| {
        (m.project.as_str(), m.name.as_str(), m.uid.as_str())
    })
}

/// Resolves `name`, referenced from an object in `project`, among `candidates`: any
/// objects of the kind, of which those named otherwise are ignored, so a caller may pass a
/// name index's entry or a whole List. Returns the candidate itself (an `Arc`, a
/// reference, …) so the caller keeps what it had.
pub fn resolve<T, C>(
    project: &str,
    name: &str,
    candidates: impl IntoIterator<Item = C>,
) -> Result<C, Unresolved>
where
    T: Referable,
    C: Deref<Target = T>,
{
    let cluster = T::KIND.scope() == Scope::Cluster;
    let mut shared: Vec<C> = Vec::new();
    for candidate in candidates {
        let (its_project, its_name, _) = meta(&*candidate);
        if its_name != name {
            continue;
        }
        if cluster || its_project == project {
            return Ok(candidate);
        }
        if candidate.is_public() {
            shared.push(candidate);
        }
    }
    match shared.len() {
        0 => Err(Unresolved::NotFound {
            kind: T::KIND,
            name: name.to_owned(),
            project: project.to_owned(),
        }),
        1 => Ok(shared.remove(0)),
        _ => {
            let mut candidates: Vec<Candidate> = shared
                .iter()
                .map(|c| {
                    let (project, _, uid) = meta(&**c);
                    Candidate {
                        project: project.to_owned(),
                        uid: uid.to_owned(),
                    }
                })
                .collect();
            candidates.sort_by(|a, b| a.project.cmp(&b.project));
            Err(Unresolved::Ambiguous {
                kind: T::KIND,
                name: name.to_owned(),
                candidates,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(project: &str, name: &str) -> Option<v1::ObjectMeta> {
        Some(v1::ObjectMeta {
            project: project.into(),
            name: name.into(),
            uid: format!("{project}/{name}"),
            ..Default::default()
        })
    }

    /// A Network; `shared` is `"shared"`, `"external"` or `"private"`.
    fn network(project: &str, name: &str, shared: &str) -> v1::Network {
        v1::Network {
            metadata: metadata(project, name),
            spec: Some(v1::NetworkSpec {
                shared: Some(shared == "shared"),
                external: Some(shared == "external"),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn image(project: &str, name: &str, public: bool) -> v1::Image {
        use v1::image_spec::Visibility;
        let visibility = if public {
            Visibility::Public
        } else {
            Visibility::Private
        };
        v1::Image {
            metadata: metadata(project, name),
            spec: Some(v1::ImageSpec {
                visibility: Some(visibility as i32),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// What a resolution comes to, in a line: the uid found, or the reason and message.
    fn outcome<T: Resource>(result: Result<&T, Unresolved>) -> String {
        match result {
            Ok(found) => format!("found {}", meta(found).2),
            Err(u) => format!("{}: {u}", u.reason()),
        }
    }

    #[test]
    fn networks() {
        let cases: &[(&str, Vec<v1::Network>, &str)] = &[
            (
                "own project",
                vec![network("p", "net", "private")],
                "found p/net",
            ),
            (
                "own project wins over a shared one of the same name",
                vec![
                    network("a", "net", "shared"),
                    network("p", "net", "private"),
                ],
                "found p/net",
            ),
            (
                "own project wins over several shared ones",
                vec![
                    network("a", "net", "shared"),
                    network("b", "net", "external"),
                    network("p", "net", "private"),
                ],
                "found p/net",
            ),
            (
                "one shared network elsewhere",
                vec![
                    network("a", "net", "shared"),
                    network("b", "net", "private"),
                ],
                "found a/net",
            ),
            (
                "an external network counts as shared",
                vec![network("a", "net", "external")],
                "found a/net",
            ),
            (
                "another project's private network is not visible",
                vec![network("a", "net", "private")],
                "NetworkNotFound: Network net not found in project p or among shared networks",
            ),
            (
                "other names are ignored",
                vec![
                    network("p", "other", "private"),
                    network("a", "other", "shared"),
                ],
                "NetworkNotFound: Network net not found in project p or among shared networks",
            ),
            (
                "nothing at all",
                vec![],
                "NetworkNotFound: Network net not found in project p or among shared networks",
            ),
            (
                "several shared networks: ambiguous, naming them by project",
                vec![
                    network("c", "net", "shared"),
                    network("a", "net", "external"),
                    network("b", "net", "private"),
                ],
                "NetworkAmbiguous: Network net is ambiguous: shared networks of that name exist \
                 in projects a, c",
            ),
        ];
        for (what, candidates, expect) in cases {
            let got = outcome(resolve("p", "net", candidates.iter()));
            assert_eq!(&got, expect, "{what}");
        }
    }

    #[test]
    fn images() {
        let cases: &[(&str, Vec<v1::Image>, &str)] = &[
            (
                "own project, private",
                vec![image("p", "tiny", false)],
                "found p/tiny",
            ),
            (
                "own project wins over a public one of the same name",
                vec![image("a", "tiny", true), image("p", "tiny", false)],
                "found p/tiny",
            ),
            (
                "one public image elsewhere",
                vec![image("a", "tiny", true), image("b", "tiny", false)],
                "found a/tiny",
            ),
            (
                "a private image elsewhere is not visible",
                vec![image("a", "tiny", false)],
                "ImageNotFound: Image tiny not found in project p or among public images",
            ),
            (
                "two public images: ambiguous",
                vec![image("b", "tiny", true), image("a", "tiny", true)],
                "ImageAmbiguous: Image tiny is ambiguous: public images of that name exist in \
                 projects a, b",
            ),
        ];
        for (what, candidates, expect) in cases {
            let got = outcome(resolve("p", "tiny", candidates.iter()));
            assert_eq!(&got, expect, "{what}");
        }
    }

    #[test]
    fn project_kinds_without_sharing_stay_in_their_project() {
        let key = |project: &str| v1::KeyPair {
            metadata: metadata(project, "demo"),
            ..Default::default()
        };
        let own = [key("p")];
        assert_eq!(outcome(resolve("p", "demo", own.iter())), "found p/demo");
        let elsewhere = [key("a")];
        assert_eq!(
            outcome(resolve("p", "demo", elsewhere.iter())),
            "KeyPairNotFound: KeyPair demo not found in project p"
        );
    }

    #[test]
    fn cluster_kinds_resolve_by_name_alone() {
        let flavor = |name: &str| v1::Flavor {
            metadata: metadata("", name),
            ..Default::default()
        };
        let flavors = [flavor("m1.small"), flavor("m1")];
        assert_eq!(outcome(resolve("p", "m1", flavors.iter())), "found /m1");
        assert_eq!(
            outcome(resolve("p", "m1.huge", flavors.iter())),
            "FlavorNotFound: Flavor m1.huge not found"
        );
    }

    #[test]
    fn an_ambiguous_name_could_mean_each_candidate_and_nothing_else() {
        let images = [image("a", "tiny", true), image("b", "tiny", true)];
        let unresolved = resolve("p", "tiny", images.iter()).unwrap_err();
        assert!(unresolved.could_mean("a/tiny"));
        assert!(unresolved.could_mean("b/tiny"));
        assert!(!unresolved.could_mean("p/tiny"));
        let missing = resolve::<v1::Image, &v1::Image>("p", "tiny", []).unwrap_err();
        assert!(!missing.could_mean("a/tiny"));
    }

    #[test]
    fn owned_and_shared_candidates_are_returned_as_given() {
        use std::sync::Arc;
        let cache = [Arc::new(network("a", "net", "shared"))];
        let found = resolve("p", "net", cache.iter().cloned()).expect("resolves");
        assert!(Arc::ptr_eq(&found, &cache[0]));
    }
}
