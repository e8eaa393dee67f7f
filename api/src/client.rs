//! The API client every Ferro component and the CLI use.
//!
//! It carries the bearer token on every call and turns gRPC statuses back into
//! [`Error`](crate::Error), so callers match on `Error::NotFound` rather than status codes.
//!
//! With [`Client::with_retry`] it also rides out an apiserver restart: the calls that are
//! harmless to repeat ([`Call::is_idempotent`]: Apply, Get, List, opening a Watch, Delete
//! with a precondition) are retried on `Unavailable` with exponential backoff and jitter,
//! for a bounded time ([`RetryPolicy`]). Create, Update, status and metadata patches and
//! Bind are never repeated: a lost reply would make a retry fail or write twice. Retries are
//! opt-in: controllers and agents requeue on their own, and a Lease renewal must not hide
//! behind seconds of retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
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
    retry: Option<RetryPolicy>,
    retry_hook: Option<RetryHook>,
    /// Whether an apiserver ever answered this client: until one did, an unreachable
    /// address is a mistake to report at once, not a restart to wait out.
    reached: Arc<AtomicBool>,
}

/// How long and how often a [`Client`] retries an idempotent call the apiserver could not
/// serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The longest one call keeps retrying, from its first attempt.
    pub total: Duration,
    /// The delay before the first retry; each next one doubles, up to `max_delay`, with
    /// jitter so that many clients do not return at once.
    pub min_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 30 s in all, from 100 ms to 2 s apart: long enough for an apiserver restart.
    fn default() -> Self {
        RetryPolicy {
            total: Duration::from_secs(30),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Told once per call that starts retrying (not once per attempt), with the error that
/// made it retry: the CLI prints `apiserver unavailable, retrying…` from it.
pub type RetryHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// The calls of the Resources service, as far as retrying them is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Apply: declares a desired state; applying it twice is applying it once.
    Apply,
    /// Get: a read.
    Get,
    /// List: a read.
    List,
    /// Opening a Watch (the events that follow are not retried: the caller resumes from
    /// the last revision it saw).
    Watch,
    /// Create: a repeat fails with AlreadyExists when the first one landed.
    Create,
    /// Update: a repeat fails with Conflict when the first one landed.
    Update,
    /// UpdateStatus: a patch of one writer's fields.
    UpdateStatus,
    /// PatchMetadata: a repeat could add or remove twice.
    PatchMetadata,
    /// Bind: a repeat fails when the first one landed.
    Bind,
    /// Delete, with or without a uid or revision precondition.
    Delete {
        /// Whether the request names the uid or revision it deletes.
        precondition: bool,
    },
}

impl Call {
    /// Whether repeating the call after a lost reply is harmless: reads, Apply, opening a
    /// Watch, and a Delete that names the object's uid or revision (a repeat finds it
    /// gone, or being deleted, rather than deleting a namesake created meanwhile).
    pub fn is_idempotent(self) -> bool {
        match self {
            Call::Apply | Call::Get | Call::List | Call::Watch => true,
            Call::Delete { precondition } => precondition,
            Call::Create | Call::Update | Call::UpdateStatus | Call::PatchMetadata | Call::Bind => {
                false
            }
        }
    }
}

/// The Consoles service over a [`Client`]'s connection.
pub type ConsolesClient =
    v1::consoles_client::ConsolesClient<InterceptedService<Channel, BearerToken>>;

/// The Images service (uploads and downloads) over a [`Client`]'s connection.
pub type ImagesClient = v1::images_client::ImagesClient<InterceptedService<Channel, BearerToken>>;

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

/// One attempt of an RPC, as a closure [`Client::call`] can run again: each attempt
/// clones the client (tonic's clients are cheap handles) and the request.
macro_rules! rpc {
    ($client:ident, $method:ident, $request:ident) => {
        || {
            let mut inner = $client.inner.clone();
            let request = $request.clone();
            async move { inner.$method(request).await }
        }
    };
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
            // Image downloads stream 1 MiB messages (see the apiserver's windows).
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
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
            retry: None,
            retry_hook: None,
            reached: Arc::default(),
        })
    }

    /// Retries idempotent calls ([`Call::is_idempotent`]) that fail with `Unavailable`
    /// once an apiserver has answered this client, within `policy`. An address that never
    /// answered fails at once: a wrong address is not worth 30 s of waiting.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Calls `hook` each time a call starts retrying (see [`RetryHook`]).
    pub fn on_retry(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.retry_hook = Some(Arc::new(hook));
        self
    }

    /// Runs one call, retrying it as [`Client::with_retry`] allows.
    async fn call<T, F, Fut>(&self, call: Call, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut once = || {
            let fut = attempt();
            async {
                match fut.await {
                    Ok(value) => {
                        self.reached.store(true, Ordering::Relaxed);
                        Ok(value)
                    }
                    Err(status) => {
                        if crate::error::answered_by_server(&status) {
                            self.reached.store(true, Ordering::Relaxed);
                        }
                        Err(Error::from(status))
                    }
                }
            }
        };
        let policy = match self.retry {
            Some(policy) if call.is_idempotent() => policy,
            _ => return once().await,
        };
        let started = Instant::now();
        let mut told = false;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(policy.total));
        once.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|error| {
                matches!(error, Error::Unavailable { .. })
                    && self.reached.load(Ordering::Relaxed)
                    && started.elapsed() < policy.total
            })
            .notify(|error, _| {
                if !told {
                    told = true;
                    if let Some(hook) = &self.retry_hook {
                        hook(error);
                    }
                }
            })
            .await
    }

    /// The Consoles service (logs, attach, and the agents' tunnel) on the same connection.
    pub fn consoles(&self) -> ConsolesClient {
        v1::consoles_client::ConsolesClient::with_interceptor(
            self.channel.clone(),
            self.token.clone(),
        )
    }

    /// The Images service (uploads and downloads) on the same connection.
    pub fn images(&self) -> ImagesClient {
        v1::images_client::ImagesClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20)
    }

    /// Uploads an Image's bytes: `target` names it, `chunks` are the bytes in order (each
    /// at most [`crate::imagestore::CHUNK_BYTES`]). Returns the Image as recorded.
    pub async fn upload_image(
        &self,
        target: v1::UploadTarget,
        chunks: impl Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<Object, Error> {
        let first = futures::stream::once(async move {
            v1::UploadImageRequest {
                target: Some(target),
                data: Vec::new(),
            }
        });
        let rest = chunks.map(|data| v1::UploadImageRequest { target: None, data });
        let response = self
            .images()
            .upload(first.chain(rest))
            .await
            .map_err(Error::from)?;
        object_of(response.into_inner())
    }

    /// Reads an uploaded Image's bytes from `offset`.
    pub async fn download_image(
        &self,
        project: &str,
        name: &str,
        offset: u64,
    ) -> Result<tonic::Streaming<v1::ImageChunk>, Error> {
        let response = self
            .images()
            .download(v1::DownloadImageRequest {
                project: project.to_owned(),
                name: name.to_owned(),
                offset,
            })
            .await
            .map_err(Error::from)?;
        Ok(response.into_inner())
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
        let response = self
            .call(Call::Apply, rpc!(self, apply, request))
            .await?
            .into_inner();
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
        let response = self.call(Call::Create, rpc!(self, create, request)).await?;
        object_of(response.into_inner())
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
        let response = self.call(Call::Get, rpc!(self, get, request)).await?;
        object_of(response.into_inner())
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
        let response = self
            .call(Call::List, rpc!(self, list, request))
            .await?
            .into_inner();
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

    /// Follows changes after `resource_version` (0: from now; what exists already is not
    /// sent, so List first and watch from the List's revision, or use
    /// [`Client::watch_list`]).
    pub async fn watch(
        &self,
        kind: Kind,
        selection: &Selection,
        resource_version: i64,
    ) -> Result<impl Stream<Item = Result<v1::WatchEvent, Error>> + Send + 'static, Error> {
        self.open_watch(kind, selection, resource_version, false)
            .await
    }

    /// Follows a kind from scratch in one call (`sendInitialEvents`): every object that
    /// matches now as an Added event, then a Bookmark at the revision they were read at,
    /// then the changes after it.
    pub async fn watch_list(
        &self,
        kind: Kind,
        selection: &Selection,
    ) -> Result<impl Stream<Item = Result<v1::WatchEvent, Error>> + Send + 'static, Error> {
        self.open_watch(kind, selection, 0, true).await
    }

    async fn open_watch(
        &self,
        kind: Kind,
        selection: &Selection,
        resource_version: i64,
        send_initial_events: bool,
    ) -> Result<impl Stream<Item = Result<v1::WatchEvent, Error>> + Send + 'static, Error> {
        let request = v1::WatchRequest {
            kind: kind.name().to_owned(),
            project: selection.project.clone(),
            all_projects: selection.all_projects,
            label_selector: selection.labels.clone(),
            field_selector: selection.fields.clone(),
            resource_version,
            send_initial_events,
        };
        let stream = self
            .call(Call::Watch, rpc!(self, watch, request))
            .await?
            .into_inner();
        Ok(stream.map(|item| item.map_err(Error::from)))
    }

    /// Replaces an object's spec and metadata; `Error::Conflict` when its resourceVersion
    /// is stale.
    pub async fn update(&self, object: Object) -> Result<Object, Error> {
        let request = v1::UpdateRequest {
            object: Some(object.into()),
            dry_run: false,
        };
        let response = self.call(Call::Update, rpc!(self, update, request)).await?;
        object_of(response.into_inner())
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
        let response = self
            .call(Call::UpdateStatus, rpc!(self, update_status, request))
            .await?;
        object_of(response.into_inner())
    }

    /// Changes finalizers, labels, annotations or owner references.
    pub async fn patch_metadata(&self, request: v1::PatchMetadataRequest) -> Result<Object, Error> {
        let response = self
            .call(Call::PatchMetadata, rpc!(self, patch_metadata, request))
            .await?;
        object_of(response.into_inner())
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
        let response = self.call(Call::Bind, rpc!(self, bind, request)).await?;
        object_of(response.into_inner())
    }

    /// Deletes an object; returns it and whether it is gone already.
    pub async fn delete(&self, request: v1::DeleteRequest) -> Result<(Object, bool), Error> {
        let call = Call::Delete {
            precondition: !request.precondition_uid.is_empty()
                || request.precondition_resource_version != 0,
        };
        let response = self
            .call(call, rpc!(self, delete, request))
            .await?
            .into_inner();
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
