//! The finalizer helper: nobody edits finalizer lists by hand.
//!
//! [`prepare`] looks at an object and the controller's finalizer and says what to do:
//! - the object is live: the finalizer is added first (one metadata patch, before any side
//!   effect that would need cleaning up), then [`Step::Apply`];
//! - the object is being deleted and still carries the finalizer: [`Step::Cleanup`], whose
//!   [`Cleanup::finish`] removes the finalizer once the cleanup is done;
//! - the object is being deleted without it: [`Step::Skip`] (someone else's cleanup runs).

use ferro_api::{Error, Resource, client::Client, v1};

use super::meta;

/// What a reconciler should do with an object.
pub enum Step {
    /// Bring the object towards its desired state.
    Apply,
    /// Clean up, then call [`Cleanup::finish`].
    Cleanup(Box<Cleanup>),
    /// Nothing: the object is going and this controller's cleanup is done.
    Skip,
}

/// A pending cleanup; finishing it removes the finalizer.
pub struct Cleanup {
    client: Client,
    key: v1::ObjectKey,
    finalizer: String,
}

impl Cleanup {
    /// Removes the finalizer; the object disappears if it was the last one.
    pub async fn finish(self) -> Result<(), Error> {
        let request = v1::PatchMetadataRequest {
            key: Some(self.key),
            remove_finalizers: vec![self.finalizer],
            ..Default::default()
        };
        match self.client.patch_metadata(request).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Decides between apply and cleanup, adding the finalizer to a live object that lacks it.
pub async fn prepare<T: Resource>(
    client: &Client,
    finalizer: &str,
    object: &T,
) -> Result<Step, Error> {
    let meta = meta(object);
    let has = meta.finalizers.iter().any(|f| f == finalizer);
    let key = v1::ObjectKey {
        kind: T::KIND.name().to_owned(),
        project: meta.project.clone(),
        name: meta.name.clone(),
    };
    match (meta.deletion_timestamp.is_some(), has) {
        (true, true) => Ok(Step::Cleanup(Box::new(Cleanup {
            client: client.clone(),
            key,
            finalizer: finalizer.to_owned(),
        }))),
        (true, false) => Ok(Step::Skip),
        (false, true) => Ok(Step::Apply),
        (false, false) => {
            let request = v1::PatchMetadataRequest {
                key: Some(key),
                // No revision precondition: a concurrent status write must not fail this.
                // If deletion started meanwhile the server refuses the new finalizer, and
                // the retry takes the cleanup path.
                add_finalizers: vec![finalizer.to_owned()],
                ..Default::default()
            };
            client.patch_metadata(request).await?;
            Ok(Step::Apply)
        }
    }
}
