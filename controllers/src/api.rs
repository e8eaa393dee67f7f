//! The controllers' connection to the apiserver.
//!
//! [`Api`] is the shared [`Client`] plus one call the client does not offer: a status write
//! guarded by the resourceVersion the decision was made from (`UpdateStatusRequest.
//! resourceVersion`). Decisions — a Port's addresses, a Network's segment — are written
//! once; the guard makes "once" hold even when two controllers briefly both lead, because
//! the second writer's revision is stale by then.

use std::{ops::Deref, time::Duration};

use ferro_api::{
    Error, Object,
    client::Client,
    v1::{self, resources_client::ResourcesClient},
};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

#[derive(Clone)]
struct Bearer(AsciiMetadataValue);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A client plus guarded status writes. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    client: Client,
    raw: ResourcesClient<InterceptedService<Channel, Bearer>>,
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
        let client = Client::connect_lazy(address, token)?;
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| {
                Error::invalid("", "server", format!("`{address}` is not an address: {e}"))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let header = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::invalid("", "token", "contains characters a header cannot carry")
        })?;
        let raw = ResourcesClient::with_interceptor(endpoint.connect_lazy(), Bearer(header));
        Ok(Api { client, raw })
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
        let request = v1::UpdateStatusRequest {
            key: Some(v1::ObjectKey {
                kind: object.kind().name().to_owned(),
                project: object.project().to_owned(),
                name: object.name().to_owned(),
            }),
            writer: writer.to_owned(),
            object: Some(object.into()),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            conditions,
            resource_version,
        };
        let response = self
            .raw
            .clone()
            .update_status(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        Object::try_from(response.object.unwrap_or_default())
    }
}
