//! The controllers' connection to the apiserver.
//!
//! [`Api`] is the shared [`Client`]; its status writes are guarded by the resourceVersion
//! the decision was made from (`UpdateStatusRequest.resourceVersion`). Decisions — a Port's addresses, a Network's segment — are written
//! once; the guard makes "once" hold even when two controllers briefly both lead, because
//! the second writer's revision is stale by then.

use std::ops::Deref;

use ferro_api::{Error, Object, client::Client, v1};

/// A client plus guarded status writes. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    client: Client,
}

impl Deref for Api {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Api {
    /// Connects lazily to `address` with `token`.
    pub fn connect_lazy(address: &str, token: &str) -> Result<Api, Error> {
        Ok(Api {
            client: Client::connect_lazy(address, token)?,
        })
    }

    /// The plain client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Patches status fields and conditions as `writer`, only if the object is still at
    /// `resource_version`; `Error::Conflict` otherwise.
    pub async fn update_status_at(
        &self,
        object: Object,
        writer: &str,
        fields: &[&str],
        conditions: Vec<v1::Condition>,
        resource_version: i64,
    ) -> Result<Object, Error> {
        self.client
            .update_status_at(object, writer, fields, conditions, resource_version)
            .await
    }
}
