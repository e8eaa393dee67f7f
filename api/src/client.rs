//! The API client every Ferro component and the CLI use.
//!
//! It carries the bearer token on every call and turns gRPC statuses back into
//! [`Error`](crate::Error), so callers match on `Error::NotFound` rather than status codes.

use futures::{Stream, StreamExt};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{Error, Kind, Object, Resource, v1, v1::resources_client::ResourcesClient};

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl Interceptor for BearerToken {
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

/// A connection to an apiserver, with a token. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Client {
    inner: ResourcesClient<InterceptedService<Channel, BearerToken>>,
    channel: Channel,
    token: BearerToken,
}

/// The Consoles service over a [`Client`]'s connection.
pub type ConsolesClient =
    v1::consoles_client::ConsolesClient<InterceptedService<Channel, BearerToken>>;

/// What a successful apply did.
pub type ApplyOutcome = v1::apply_response::Outcome;

/// A page of a list.
#[derive(Clone, Debug)]
pub struct Page {
    /// The objects.
    pub items: Vec<Object>,
    /// The token of the next page; empty on the last one.
    pub continue_token: String,
    /// The revision the list was read at.
    pub resource_version: i64,
}

/// Which objects a List or Watch covers.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// One project; empty means `default` (ignored for cluster-scoped kinds).
    pub project: String,
    /// Every project.
    pub all_projects: bool,
    /// A label selector.
    pub labels: String,
    /// A field selector.
    pub fields: String,
}

impl Selection {
    /// Every object of the kind, in every project.
    pub fn all() -> Self {
        Selection {
            all_projects: true,
            ..Default::default()
        }
    }

    /// One project's objects.
    pub fn project(project: impl Into<String>) -> Self {
        Selection {
            project: project.into(),
            ..Default::default()
        }
    }

    /// Adds a field selector.
    pub fn fields(mut self, fields: impl Into<String>) -> Self {
        self.fields = fields.into();
        self
    }

    /// Adds a label selector.
    pub fn labels(mut self, labels: impl Into<String>) -> Self {
        self.labels = labels.into();
        self
    }
}

fn key(kind: Kind, project: &str, name: &str) -> Option<v1::ObjectKey> {
    Some(v1::ObjectKey {
        kind: kind.name().to_owned(),
        project: project.to_owned(),
        name: name.to_owned(),
    })
}

fn object_of(response: v1::ObjectResponse) -> Result<Object, Error> {
    Object::try_from(response.object.unwrap_or_default())
}

impl Client {
    /// Connects to `address` (`http://127.0.0.1:7443` or `127.0.0.1:7443`) lazily: the
    /// first call opens the connection, and it reconnects after failures.
    pub fn connect_lazy(address: &str, token: &str) -> Result<Self, Error> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| {
                Error::invalid("", "server", format!("`{address}` is not an address: {e}"))
            })?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let header = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::invalid("", "token", "contains characters a header cannot carry")
        })?;
        let channel = endpoint.connect_lazy();
        let token = BearerToken(header);
        let inner = ResourcesClient::with_interceptor(channel.clone(), token.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(8 << 20);
        Ok(Client {
            inner,
            channel,
            token,
        })
    }

    /// The Consoles service (logs, attach, and the agents' tunnel) on the same connection.
    pub fn consoles(&self) -> ConsolesClient {
        v1::consoles_client::ConsolesClient::with_interceptor(
            self.channel.clone(),
            self.token.clone(),
        )
    }

    /// Creates or updates an object from its desired state.
    pub async fn apply(
        &self,
        object: Object,
        manager: &str,
        dry_run: bool,
    ) -> Result<(Object, ApplyOutcome), Error> {
        let request = v1::ApplyRequest {
            object: Some(object.into()),
            manager: manager.to_owned(),
            dry_run,
        };
        let response = self.inner.clone().apply(request).await?.into_inner();
        let outcome = ApplyOutcome::try_from(response.outcome).unwrap_or(ApplyOutcome::Unspecified);
        Ok((
            Object::try_from(response.object.unwrap_or_default())?,
            outcome,
        ))
    }

    /// Creates an object; `Error::AlreadyExists` when the name is taken.
    pub async fn create(&self, object: Object) -> Result<Object, Error> {
        let request = v1::CreateRequest {
            object: Some(object.into()),
            dry_run: false,
        };
        object_of(self.inner.clone().create(request).await?.into_inner())
    }

    /// Creates a typed object.
    pub async fn create_typed<T: Resource>(&self, object: T) -> Result<T, Error> {
        let created = self.create(object.into_object()).await?;
        T::from_object(created).ok_or_else(|| Error::internal("the server answered another kind"))
    }

    /// Reads one object.
    pub async fn get(&self, kind: Kind, project: &str, name: &str) -> Result<Object, Error> {
        let request = v1::GetRequest {
            key: key(kind, project, name),
        };
        object_of(self.inner.clone().get(request).await?.into_inner())
    }

    /// Reads one typed object.
    pub async fn get_typed<T: Resource>(&self, project: &str, name: &str) -> Result<T, Error> {
        let object = self.get(T::KIND, project, name).await?;
        T::from_object(object).ok_or_else(|| Error::internal("the server answered another kind"))
    }

    /// Reads one page of a list.
    pub async fn list_page(
        &self,
        kind: Kind,
        selection: &Selection,
        limit: u32,
        continue_token: &str,
    ) -> Result<Page, Error> {
        let request = v1::ListRequest {
            kind: kind.name().to_owned(),
            project: selection.project.clone(),
            all_projects: selection.all_projects,
            label_selector: selection.labels.clone(),
            field_selector: selection.fields.clone(),
            limit,
            continue_token: continue_token.to_owned(),
        };
        let response = self.inner.clone().list(request).await?.into_inner();
        Ok(Page {
            items: response
                .items
                .into_iter()
                .map(Object::try_from)
                .collect::<Result<_, _>>()?,
            continue_token: response.continue_token,
            resource_version: response.resource_version,
        })
    }

    /// Reads every page of a list; returns the objects and the revision of the first page.
    pub async fn list(
        &self,
        kind: Kind,
        selection: &Selection,
    ) -> Result<(Vec<Object>, i64), Error> {
        let mut page = self.list_page(kind, selection, 0, "").await?;
        let revision = page.resource_version;
        let mut items = std::mem::take(&mut page.items);
        while !page.continue_token.is_empty() {
            page = self
                .list_page(kind, selection, 0, &page.continue_token)
                .await?;
            items.append(&mut page.items);
        }
        Ok((items, revision))
    }

    /// Follows changes after `resource_version` (0: from now).
    pub async fn watch(
        &self,
        kind: Kind,
        selection: &Selection,
        resource_version: i64,
    ) -> Result<impl Stream<Item = Result<v1::WatchEvent, Error>> + Send + 'static, Error> {
        let request = v1::WatchRequest {
            kind: kind.name().to_owned(),
            project: selection.project.clone(),
            all_projects: selection.all_projects,
            label_selector: selection.labels.clone(),
            field_selector: selection.fields.clone(),
            resource_version,
        };
        let stream = self.inner.clone().watch(request).await?.into_inner();
        Ok(stream.map(|item| item.map_err(Error::from)))
    }

    /// Replaces an object's spec and metadata; `Error::Conflict` when its resourceVersion
    /// is stale.
    pub async fn update(&self, object: Object) -> Result<Object, Error> {
        let request = v1::UpdateRequest {
            object: Some(object.into()),
            dry_run: false,
        };
        object_of(self.inner.clone().update(request).await?.into_inner())
    }

    /// Patches status fields and conditions as `writer`.
    pub async fn update_status(
        &self,
        object: Object,
        writer: &str,
        fields: &[&str],
        conditions: Vec<v1::Condition>,
    ) -> Result<Object, Error> {
        self.update_status_at(object, writer, fields, conditions, 0)
            .await
    }

    /// Patches status fields and conditions as `writer`, only while the object is still at
    /// `resource_version` (`Error::Conflict` otherwise); `0` means at any revision.
    pub async fn update_status_at(
        &self,
        object: Object,
        writer: &str,
        fields: &[&str],
        conditions: Vec<v1::Condition>,
        resource_version: i64,
    ) -> Result<Object, Error> {
        let request = v1::UpdateStatusRequest {
            key: key(object.kind(), object.project(), object.name()),
            writer: writer.to_owned(),
            object: Some(object.into()),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            conditions,
            resource_version,
        };
        object_of(
            self.inner
                .clone()
                .update_status(request)
                .await?
                .into_inner(),
        )
    }

    /// Changes finalizers, labels, annotations or owner references.
    pub async fn patch_metadata(&self, request: v1::PatchMetadataRequest) -> Result<Object, Error> {
        object_of(
            self.inner
                .clone()
                .patch_metadata(request)
                .await?
                .into_inner(),
        )
    }

    /// Places a Server on a Node.
    pub async fn bind(
        &self,
        project: &str,
        name: &str,
        node: &str,
        flavor: v1::FlavorSnapshot,
    ) -> Result<Object, Error> {
        let request = v1::BindRequest {
            project: project.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            flavor: Some(flavor),
            uid: String::new(),
        };
        object_of(self.inner.clone().bind(request).await?.into_inner())
    }

    /// Deletes an object; returns it and whether it is gone already.
    pub async fn delete(&self, request: v1::DeleteRequest) -> Result<(Object, bool), Error> {
        let response = self.inner.clone().delete(request).await?.into_inner();
        Ok((
            Object::try_from(response.object.unwrap_or_default())?,
            response.gone,
        ))
    }

    /// Deletes an object by key in the background.
    pub async fn delete_key(
        &self,
        kind: Kind,
        project: &str,
        name: &str,
    ) -> Result<(Object, bool), Error> {
        self.delete(v1::DeleteRequest {
            key: key(kind, project, name),
            ..Default::default()
        })
        .await
    }
}
