//! The apiserver: the `Resources` gRPC service over a [`Store`].
//!
//! Objects are stored as the protobuf encoding of their kind's message under the key of
//! [`Kind::key`]; their `resourceVersion` is not stored but taken from the key's mod
//! revision on every read, as Kubernetes does. Every write is a compare-and-swap on that
//! revision, so concurrent writers never lose each other's changes: server-side patches
//! (apply, status, metadata, bind, delete) re-read and retry; a client's Update with a
//! resourceVersion fails with `Conflict` instead.
//!
//! Admission happens here, before anything is written: authentication, authorization,
//! defaulting, validation, the status owner table, and the project's quota, charged in
//! the write's own transaction ([`crate::quota`]). A refused request writes nothing.

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use ferro_store::{
    Compare, KeyRange, KeyValue, RangeRequest, Revision, Store, StoreError, Txn, TxnOp,
    WatchRequest as StoreWatch,
};
use futures::{Stream, StreamExt};
use prost_reflect::{DynamicMessage, ReflectMessage, Value as ProtoValue};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::{
    Error, Kind, Object, auth,
    auth::{Authorizer, Identity, Tokens, Verb},
    cache::{CacheOptions, Query, WatchCache},
    console::ConsoleRelay,
    encoded::{EncodedEvent, EncodedStream},
    kinds::Scope,
    owners, quota,
    selector::{FieldSelector, LabelSelector, node_of},
    v1::{self, resources_server::Resources},
    validation,
};

/// The project an object lands in when none is given.
pub const DEFAULT_PROJECT: &str = "default";

/// The finalizer Delete adds for foreground propagation; the garbage collector removes it
/// once the dependents that block owner deletion are gone.
pub const FOREGROUND_FINALIZER: &str = "ferro.io/foreground-deletion";

/// The finalizer Delete adds for orphan propagation; the garbage collector removes it once
/// the dependents no longer name this owner.
pub const ORPHAN_FINALIZER: &str = "ferro.io/orphan";

/// Size and paging limits, explicit so clients can rely on them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest request message accepted.
    pub max_request_bytes: usize,
    /// The largest response message sent.
    pub max_response_bytes: usize,
    /// Objects per List page when the request gives no limit.
    pub default_page_size: usize,
    /// The most objects per List page.
    pub max_page_size: usize,
    /// A List page ends once its objects add up to this many bytes.
    pub max_page_bytes: usize,
    /// How often an idle watch receives a bookmark.
    pub bookmark_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 4 << 20,
            max_response_bytes: 16 << 20,
            default_page_size: 500,
            max_page_size: 5_000,
            max_page_bytes: 8 << 20,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// How many times a server-side patch re-reads after losing a compare-and-swap race.
const MAX_RETRIES: usize = 64;

/// The apiserver's state; cheap to clone.
#[derive(Clone)]
pub struct ApiServer {
    store: Arc<dyn Store>,
    cache: Option<Arc<WatchCache>>,
    relay: Arc<ConsoleRelay>,
    tokens: Arc<Tokens>,
    authorizer: Authorizer,
    limits: Limits,
    image_store: Option<Arc<crate::imagestore::ImageStore>>,
}

impl ApiServer {
    /// An apiserver over a store, accepting the given tokens.
    pub fn new(store: Arc<dyn Store>, tokens: Tokens) -> Self {
        let cache = Some(WatchCache::new(store.clone(), CacheOptions::default()));
        ApiServer {
            store,
            cache,
            relay: Arc::default(),
            tokens: Arc::new(tokens),
            authorizer: Authorizer,
            limits: Limits::default(),
            image_store: None,
        }
    }

    /// Keeps uploaded images' bytes in `store` and serves the Images service; without
    /// one, uploads are refused.
    pub fn with_image_store(mut self, store: Arc<crate::imagestore::ImageStore>) -> Self {
        self.image_store = Some(store);
        self
    }

    pub(crate) fn image_store(&self) -> Option<&Arc<crate::imagestore::ImageStore>> {
        self.image_store.as_ref()
    }

    /// Serves List and Watch from the store directly, without a watch cache.
    pub fn without_cache(mut self) -> Self {
        self.cache = None;
        self
    }

    /// Replaces the watch cache's tuning.
    pub fn with_cache_options(mut self, options: CacheOptions) -> Self {
        self.cache = Some(WatchCache::new(self.store.clone(), options));
        self
    }

    /// Replaces the default limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The gRPC service, with the message size limits applied.
    pub fn into_service(self) -> crate::encoded::ResourcesService {
        crate::encoded::ResourcesService::new(self)
    }

    /// The size limits and tuning this server runs with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Serves a Watch with each event's shared encoding.
    pub(crate) async fn watch_encoded(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<EncodedStream>, Status> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(self.do_watch(&who, request.into_inner()).await)
    }

    /// The Consoles gRPC service (logs, attach, agents' tunnels), sharing this server's
    /// state.
    pub fn consoles_service(&self) -> v1::consoles_server::ConsolesServer<ApiServer> {
        v1::consoles_server::ConsolesServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
            .max_encoding_message_size(self.limits.max_response_bytes)
    }

    /// Serves the Resources and Consoles services, gRPC reflection and the standard health
    /// service on a listener until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.serve_on(vec![listener], shutdown).await
    }

    /// [`ApiServer::serve`] on several listeners at once, one server behind them all: the
    /// loopback address for the CLI and, under `ferro up --nodes N`, the host's underlay
    /// address for the agents in their namespaces. One server, so that a console tunnel an
    /// agent opens on one address serves a CLI that came in on another.
    pub async fn serve_on(
        self,
        listeners: Vec<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(cache) = &self.cache {
            cache.warm();
        }
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<v1::resources_server::ResourcesServer<ApiServer>>()
            .await;
        // Both reflection protocols: grpcurl and grpc-java speak v1, grpcio's reflection
        // client and older tools only v1alpha. Each lists every service served here,
        // health and both reflections included.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        tonic::transport::Server::builder()
            // Image uploads stream 1 MiB messages: windows and frames of that order keep
            // a loopback upload from waiting on flow control every 64 KiB.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .max_frame_size(Some(1 << 20))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(self.consoles_service())
            .add_service(self.images_service())
            .add_service(self.into_service())
            .serve_with_incoming_shutdown(
                // Small gRPC frames (watch events, replies) must not wait for Nagle's
                // algorithm and the peer's delayed ACK: that alone costs ~40 ms each.
                futures::stream::select_all(
                    listeners
                        .into_iter()
                        .map(tokio_stream::wrappers::TcpListenerStream::new),
                )
                .map(|socket| {
                    socket.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                }),
                shutdown,
            )
            .await?;
        Ok(())
    }

    pub(crate) fn authenticate<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        self.identity(request).map_err(Status::from)
    }

    pub(crate) fn authorize(
        &self,
        who: &Identity,
        request: &auth::Request<'_>,
    ) -> Result<(), Error> {
        self.authorizer.authorize(who, request)
    }

    pub(crate) fn relay(&self) -> Arc<ConsoleRelay> {
        self.relay.clone()
    }

    pub(crate) async fn get_object(
        &self,
        kind: Kind,
        project: &str,
        name: &str,
    ) -> Result<Object, Error> {
        let key = Key {
            kind,
            project: scoped_project(kind, project),
            name: name.to_owned(),
        };
        Ok(self.read(&key).await?.0)
    }

    /// Quota admission over this server's store and cache.
    fn quota(&self) -> quota::Admission {
        quota::Admission::new(self.store.clone(), self.cache.clone())
    }

    fn identity<T>(&self, request: &Request<T>) -> Result<Identity, Error> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.tokens.authenticate(header)
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn now() -> prost_types::Timestamp {
    let ts = jiff::Timestamp::now();
    prost_types::Timestamp {
        seconds: ts.as_second(),
        nanos: ts.subsec_nanosecond(),
    }
}

pub(crate) fn store_error(error: StoreError) -> Error {
    match error {
        StoreError::Compacted {
            requested,
            compacted,
        } => Error::Expired {
            message: format!(
                "resourceVersion {requested} is too old (history kept from {compacted}); list again"
            ),
        },
        StoreError::FutureRevision { requested, current } => Error::invalid(
            "",
            "resourceVersion",
            format!("{requested} is newer than the store's current revision {current}"),
        ),
        StoreError::Unavailable(message) => Error::Unavailable {
            message: format!("store unavailable: {message}"),
        },
        StoreError::InvalidArgument(reason) => {
            Error::invalid("", "", format!("the store refused the request: {reason}"))
        }
        StoreError::LeaseNotFound(lease) => Error::NotFound {
            object: format!("lease {lease}"),
        },
        other => Error::internal(other),
    }
}

fn parse_kind(name: &str) -> Result<Kind, Error> {
    Kind::from_kind_name(name)
        .or_else(|| Kind::lookup(name))
        .ok_or_else(|| Error::invalid("", "kind", format!("unknown kind `{name}`")))
}

/// Resolves a request's project for a kind: cluster-scoped kinds have none; project-scoped
/// ones default to `default`.
fn scoped_project(kind: Kind, project: &str) -> String {
    match kind.scope() {
        Scope::Cluster => String::new(),
        Scope::Project if project.is_empty() => DEFAULT_PROJECT.to_owned(),
        Scope::Project => project.to_owned(),
    }
}

struct Key {
    kind: Kind,
    project: String,
    name: String,
}

impl Key {
    fn from_proto(key: Option<v1::ObjectKey>) -> Result<Key, Error> {
        let key = key.ok_or_else(|| Error::invalid("", "key", "required"))?;
        let kind = parse_kind(&key.kind)?;
        if key.name.is_empty() {
            return Err(Error::invalid("", "key.name", "required"));
        }
        Ok(Key {
            kind,
            project: scoped_project(kind, &key.project),
            name: key.name,
        })
    }
    fn store_key(&self) -> String {
        self.kind.key(&self.project, &self.name)
    }
    fn display(&self) -> String {
        format!("{}/{}", self.kind.plural(), self.name)
    }
}

pub(crate) fn decode_kv(kind: Kind, kv: &KeyValue) -> Result<Object, Error> {
    let mut object = Object::decode(kind, &kv.value).map_err(|e| {
        Error::internal(format!(
            "stored {} at {} does not decode: {e}",
            kind.name(),
            kv.key
        ))
    })?;
    object.metadata_mut().resource_version = kv.mod_revision;
    Ok(object)
}

fn encode_for_store(object: &Object) -> Vec<u8> {
    let mut object = object.clone();
    object.metadata_mut().resource_version = 0;
    object.encode_to_vec()
}

/// Reads a part (`spec` or `status`) of an object reflectively.
fn part(object: &Object, name: &str) -> Option<DynamicMessage> {
    let message = object.to_dynamic();
    let field = message.descriptor().get_field_by_name(name)?;
    if !message.has_field(&field) {
        return None;
    }
    match message.get_field(&field).into_owned() {
        ProtoValue::Message(m) => Some(m),
        _ => None,
    }
}

/// Replaces (or clears) a part of an object reflectively.
fn with_part(object: &Object, name: &str, value: Option<DynamicMessage>) -> Object {
    let mut message = object.to_dynamic();
    match value {
        Some(v) => message.set_field_by_name(name, ProtoValue::Message(v)),
        None => message.clear_field_by_name(name),
    }
    Object::from_dynamic(object.kind(), &message).expect("an object re-encodes as its own kind")
}

/// Refuses to delete a Volume attached to a server that is not among `leaving` (see
/// `ApiServer::leaving_servers`).
fn refuse_deleting_in_use(
    object: &Object,
    leaving: &BTreeSet<String>,
    display: &str,
) -> Result<(), Error> {
    let Object::Volume(volume) = object else {
        return Ok(());
    };
    let staying: Vec<&str> = volume
        .status
        .iter()
        .flat_map(|s| &s.attachments)
        .map(|a| a.server.as_str())
        .filter(|server| !leaving.contains(*server))
        .collect();
    if staying.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition {
        object: display.to_owned(),
        message: format!(
            "is attached to server {}: remove it from that server's spec.volumes (or delete \
             the server, if it boots from it) first",
            staying.join(", ")
        ),
    })
}

/// Strips what only the server may set from a client's object.
fn admit(mut object: Object) -> Object {
    object.clear_status();
    let meta = object.metadata_mut();
    meta.uid.clear();
    meta.resource_version = 0;
    meta.generation = 0;
    meta.creation_timestamp = None;
    meta.deletion_timestamp = None;
    meta.managed_keys.clear();
    object
}

/// Defaults and validates an object for creation, and gives it the server's metadata.
fn prepare_new(mut object: Object) -> Result<Object, Error> {
    validation::apply_defaults(&mut object);
    validation::validate_create(&object)?;
    validation::observe_at_admission(&mut object);
    let meta = object.metadata_mut();
    meta.uid = uuid::Uuid::new_v4().to_string();
    meta.generation = 1;
    meta.creation_timestamp = Some(now());
    Ok(object)
}

fn spec_equal(a: &Object, b: &Object) -> bool {
    a.spec_eq(b)
}

fn is_deleting(object: &Object) -> bool {
    object
        .metadata()
        .is_some_and(|m| m.deletion_timestamp.is_some())
}

/// What a server-side patch decided.
enum Change {
    /// Nothing to write; here is the object as it is.
    Unchanged(Object),
    /// Write this object.
    Put(Object),
    /// Remove the object (its last finalizer went while it was being deleted).
    Remove(Object),
}

impl ApiServer {
    /// The objects [`validation::validate_references`] needs for an object of `kind`, read
    /// from the store; `None` for kinds it does not check.
    async fn others_for(&self, object: &Object) -> Result<Option<validation::Others>, Error> {
        let kind = object.kind();
        if !validation::checks_references(object) {
            return Ok(None);
        }
        let mut others = validation::Others::default();
        if kind == Kind::Server {
            for object in self.read_all(Kind::Volume).await? {
                if let Object::Volume(volume) = object {
                    others.volumes.push(volume);
                }
            }
            for object in self.read_all(Kind::Server).await? {
                if let Object::Server(server) = object {
                    others.servers.push(server);
                }
            }
            return Ok(Some(others));
        }
        for object in self.read_all(Kind::Network).await? {
            if let Object::Network(network) = object {
                others.networks.push(network);
            }
        }
        if kind == Kind::Router {
            for object in self.read_all(Kind::Router).await? {
                if let Object::Router(router) = object {
                    others.routers.push(router);
                }
            }
        }
        Ok(Some(others))
    }

    /// The servers a Volume's `status.attachments` names that do not hold it back: gone,
    /// or being deleted. Deleting the volume is refused (inside the delete's transaction,
    /// against the attachments as they are then) while any other server has it: its data
    /// would go from under a running guest. A server being deleted does not hold it back
    /// (`ferro delete -f` of a whole stack works); the volume's node removes the bytes only
    /// once no guest has the volume any more.
    async fn leaving_servers(&self, key: &Key) -> Result<BTreeSet<String>, Error> {
        let volume = match self.read(key).await {
            Ok((Object::Volume(volume), _)) => volume,
            Ok(_) | Err(Error::NotFound { .. }) => return Ok(BTreeSet::new()),
            Err(e) => return Err(e),
        };
        let mut leaving = BTreeSet::new();
        for attachment in volume.status.iter().flat_map(|s| &s.attachments) {
            let server = Key {
                kind: Kind::Server,
                project: key.project.clone(),
                name: attachment.server.clone(),
            };
            match self.read(&server).await {
                Ok((server, _))
                    if server
                        .metadata()
                        .is_some_and(|m| m.deletion_timestamp.is_none()) => {}
                Ok(_) | Err(Error::NotFound { .. }) => {
                    leaving.insert(attachment.server.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(leaving)
    }

    /// Refuses to delete a Volume that live VolumeSnapshots copy: they are the only
    /// thing that could bring its data back, so they go first, on purpose.
    async fn refuse_deleting_with_snapshots(&self, key: &Key, display: &str) -> Result<(), Error> {
        let page = self
            .store
            .range(RangeRequest::prefix(
                Kind::VolumeSnapshot.prefix(Some(&key.project)),
            ))
            .await
            .map_err(store_error)?;
        let mut names = Vec::new();
        for kv in &page.kvs {
            if let Object::VolumeSnapshot(snapshot) = decode_kv(Kind::VolumeSnapshot, kv)? {
                let copies = snapshot.spec.as_ref().is_some_and(|s| s.volume == key.name);
                let meta = snapshot.metadata.unwrap_or_default();
                if copies && meta.deletion_timestamp.is_none() {
                    names.push(meta.name);
                }
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        Err(Error::FailedPrecondition {
            object: display.to_owned(),
            message: format!("has snapshots {}: delete them first", names.join(", ")),
        })
    }

    /// Every object of a kind, in every project.
    async fn read_all(&self, kind: Kind) -> Result<Vec<Object>, Error> {
        let page = self
            .store
            .range(RangeRequest::prefix(kind.prefix(None)))
            .await
            .map_err(store_error)?;
        page.kvs.iter().map(|kv| decode_kv(kind, kv)).collect()
    }

    /// Refuses a Router or FloatingIP whose spec contradicts the objects it names; a write
    /// that leaves the spec as `before` had it is not checked again.
    async fn check_references(
        &self,
        object: &Object,
        before: Option<&Object>,
    ) -> Result<(), Error> {
        if before.is_some_and(|b| spec_equal(b, object)) {
            return Ok(());
        }
        if let Some(others) = self.others_for(object).await? {
            validation::validate_references(object, &others)?;
        }
        Ok(())
    }

    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        self.store.get(key).await.map_err(store_error)
    }

    async fn read(&self, key: &Key) -> Result<(Object, KeyValue), Error> {
        let kv = self
            .get_kv(&key.store_key())
            .await?
            .ok_or_else(|| Error::NotFound {
                object: key.display(),
            })?;
        Ok((decode_kv(key.kind, &kv)?, kv))
    }

    /// Creates an object unless its key exists, charging its project's quota in the same
    /// transaction; returns it with its resourceVersion.
    async fn insert(&self, object: Object) -> Result<Option<Object>, Error> {
        let key = object.key();
        let txn = Txn {
            compare: vec![Compare::absent(key.clone())],
            success: vec![TxnOp::Put {
                key,
                value: encode_for_store(&object),
                lease: None,
            }],
            failure: vec![],
        };
        let Some(response) = self.quota().commit(None, &object, txn).await? else {
            return Ok(None);
        };
        let mut object = object;
        object.metadata_mut().resource_version = response.revision;
        Ok(Some(object))
    }

    /// Writes `new` (or removes the key) if the key is still at `revision`. A spec change
    /// over `before` is charged to the project's quota for what it adds (a resize).
    async fn swap(
        &self,
        revision: Revision,
        change: &Change,
        also: Option<Compare>,
        before: Option<&Object>,
    ) -> Result<Option<Object>, Error> {
        let (object, op) = match change {
            Change::Unchanged(o) => return Ok(Some(o.clone())),
            Change::Put(o) => (
                o,
                TxnOp::Put {
                    key: o.key(),
                    value: encode_for_store(o),
                    lease: None,
                },
            ),
            Change::Remove(o) => (o, TxnOp::Delete(KeyRange::Key(o.key()))),
        };
        let mut compare = vec![Compare::mod_revision(object.key(), revision)];
        compare.extend(also);
        let txn = Txn {
            compare,
            success: vec![op],
            failure: vec![],
        };
        let charged = match (change, before) {
            (Change::Put(next), Some(before)) if !spec_equal(before, next) => Some(before),
            _ => None,
        };
        let response = match charged {
            Some(before) => self.quota().commit(Some(before), object, txn).await?,
            None => {
                let response = self.store.txn(txn).await.map_err(store_error)?;
                response.succeeded.then_some(response)
            }
        };
        let Some(response) = response else {
            return Ok(None);
        };
        let mut object = object.clone();
        object.metadata_mut().resource_version = response.revision;
        Ok(Some(object))
    }

    /// Read-modify-write with retries: `decide` sees the current object each time.
    ///
    /// The first attempt decides from the watch cache's copy, which spares the store a read
    /// (etcd 3.4 copies its pending-write buffer for every read, which is most of its cost
    /// under write load). The copy may be behind, so only a write is trusted from it: the
    /// swap's revision guard refuses it if the object has moved. A decision to write
    /// nothing, or an error, may be the stale copy's doing, so those are decided again
    /// from the store.
    async fn modify(
        &self,
        key: &Key,
        decide: impl FnMut(Object) -> Result<Change, Error>,
    ) -> Result<(Object, bool, bool), Error> {
        self.modify_given(key, None, decide).await
    }

    /// [`Self::modify`] for a decision that also rests on a second object: `given.1`
    /// checks it (absent: `None`) before each attempt, read the same way as the object,
    /// and the swap requires it unchanged since, so the decision holds atomically.
    async fn modify_given(
        &self,
        key: &Key,
        mut given: Option<(&Key, &mut SecondCheck<'_>)>,
        mut decide: impl FnMut(Object) -> Result<Change, Error>,
    ) -> Result<(Object, bool, bool), Error> {
        let cached = |key: &Key| {
            self.cache
                .as_ref()
                .and_then(|c| c.get(key.kind, &key.store_key()))
        };
        let revision_of = |o: &Object| o.metadata().map(|m| m.resource_version).unwrap_or_default();
        for attempt in 0..MAX_RETRIES {
            let mut optimistic = attempt == 0;
            let object = if optimistic { cached(key) } else { None };
            optimistic &= object.is_some();
            // The second object, and the guard that it stays as checked.
            let mut also = None;
            if let Some((other_key, check)) = given.as_mut() {
                let from_cache = if optimistic { cached(other_key) } else { None };
                optimistic &= from_cache.is_some();
                let other = match from_cache {
                    Some(o) => Some(Arc::unwrap_or_clone(o)),
                    None => match self.get_kv(&other_key.store_key()).await? {
                        Some(kv) => Some(decode_kv(other_key.kind, &kv)?),
                        None => None,
                    },
                };
                match check(other.as_ref()) {
                    Ok(()) => {}
                    Err(_) if optimistic => continue,
                    Err(e) => return Err(e),
                }
                let revision = other.as_ref().map(revision_of).unwrap_or_default();
                also = Some(Compare::mod_revision(other_key.store_key(), revision));
            }
            let (current, revision) = match object.filter(|_| optimistic) {
                Some(object) => {
                    let revision = revision_of(&object);
                    (Arc::unwrap_or_clone(object), revision)
                }
                None => {
                    let (current, kv) = self.read(key).await?;
                    (current, kv.mod_revision)
                }
            };
            let before = quota::counts(key.kind).then(|| current.clone());
            let change = match decide(current) {
                Ok(Change::Unchanged(_)) | Err(_) if optimistic => continue,
                change => change?,
            };
            let (written, removed) = match &change {
                Change::Unchanged(_) => (false, false),
                Change::Put(_) => (true, false),
                Change::Remove(_) => (true, true),
            };
            match self.swap(revision, &change, also, before.as_ref()).await {
                Ok(Some(object)) => return Ok((object, written, removed)),
                Ok(None) => {}
                // A quota refusal of a growth measured from a stale copy is decided again.
                Err(Error::ResourceExhausted { .. }) if optimistic => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            message: format!("{}: too many concurrent writers; retry", key.display()),
        })
    }
}

/// A check of the second object a read-modify-write decision rests on (`None`: it does
/// not exist).
type SecondCheck<'a> = dyn FnMut(Option<&Object>) -> Result<(), Error> + Send + 'a;

/// Merges labels or annotations for an apply by `manager`: keys it sends are set; keys it
/// set last time and no longer sends are removed; everyone else's keys stay.
fn merge_owned(
    current: &HashMap<String, String>,
    applied: &HashMap<String, String>,
    previously_owned: &[String],
) -> HashMap<String, String> {
    let mut merged = current.clone();
    for key in previously_owned {
        if !applied.contains_key(key) {
            merged.remove(key);
        }
    }
    merged.extend(applied.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
}

fn sorted_keys(map: &HashMap<String, String>) -> Vec<String> {
    let mut keys: Vec<String> = map.keys().cloned().collect();
    keys.sort();
    keys
}

/// The result of applying `applied` (admitted and defaulted) over `current` by `manager`.
fn apply_over(current: &Object, applied: &Object, manager: &str) -> Object {
    let mut next = current.clone();
    next.set_spec_from(applied);
    let empty = v1::ObjectMeta::default();
    let old_meta = current.metadata().unwrap_or(&empty);
    let new_meta = applied.metadata().unwrap_or(&empty);
    let owned = old_meta.managed_keys.iter().find(|m| m.manager == manager);
    let (owned_labels, owned_annotations) = owned
        .map(|m| (m.labels.as_slice(), m.annotations.as_slice()))
        .unwrap_or_default();
    let meta = next.metadata_mut();
    meta.labels = merge_owned(&old_meta.labels, &new_meta.labels, owned_labels);
    meta.annotations = merge_owned(
        &old_meta.annotations,
        &new_meta.annotations,
        owned_annotations,
    );
    record_manager(meta, manager, &new_meta.labels, &new_meta.annotations);
    if !spec_equal(current, &next) {
        meta_generation_bump(&mut next);
    }
    next
}

fn meta_generation_bump(object: &mut Object) {
    object.metadata_mut().generation += 1;
}

fn record_manager(
    meta: &mut v1::ObjectMeta,
    manager: &str,
    labels: &HashMap<String, String>,
    annotations: &HashMap<String, String>,
) {
    let entry = v1::ManagedKeys {
        manager: manager.to_owned(),
        labels: sorted_keys(labels),
        annotations: sorted_keys(annotations),
    };
    // A manager that sets no keys owns none: recording it would make the first apply by
    // a new manager (say, `get -o yaml | apply` of a seeded object) write for nothing.
    let owns_nothing = entry.labels.is_empty() && entry.annotations.is_empty();
    match meta.managed_keys.iter().position(|m| m.manager == manager) {
        Some(i) if owns_nothing => {
            meta.managed_keys.remove(i);
        }
        Some(i) => meta.managed_keys[i] = entry,
        None if owns_nothing => {}
        None => {
            meta.managed_keys.push(entry);
            meta.managed_keys.sort_by(|a, b| a.manager.cmp(&b.manager));
        }
    }
}

/// The `Scheduled` condition a Bind to `node` records.
pub fn scheduled_condition(node: &str) -> v1::Condition {
    v1::Condition {
        r#type: "Scheduled".into(),
        status: v1::condition::Status::True as i32,
        reason: "Scheduled".into(),
        message: format!("placed on node {node}"),
        ..Default::default()
    }
}

/// Merges conditions by type; a condition whose status did not change keeps its
/// transition time.
fn merge_conditions(
    existing: &mut Vec<v1::Condition>,
    incoming: &[v1::Condition],
    generation: i64,
) {
    for condition in incoming {
        let mut condition = condition.clone();
        if condition.observed_generation == 0 {
            condition.observed_generation = generation;
        }
        match existing.iter_mut().find(|c| c.r#type == condition.r#type) {
            Some(current) => {
                condition.last_transition_time = if current.status == condition.status {
                    current
                        .last_transition_time
                        .or(condition.last_transition_time)
                        .or_else(|| Some(now()))
                } else {
                    condition.last_transition_time.or_else(|| Some(now()))
                };
                *current = condition;
            }
            None => {
                condition.last_transition_time =
                    condition.last_transition_time.or_else(|| Some(now()));
                existing.push(condition);
            }
        }
    }
}

fn conditions_of(status: &DynamicMessage) -> Result<Vec<v1::Condition>, Error> {
    let Some(field) = status.descriptor().get_field_by_name("conditions") else {
        return Ok(Vec::new());
    };
    let value = status.get_field(&field);
    let Some(list) = value.as_list() else {
        return Ok(Vec::new());
    };
    list.iter()
        .filter_map(|v| v.as_message())
        .map(|m| m.transcode_to::<v1::Condition>().map_err(Error::internal))
        .collect()
}

fn set_conditions(status: &mut DynamicMessage, conditions: &[v1::Condition]) {
    let desc = crate::descriptor_pool()
        .get_message_by_name("ferro.v1.Condition")
        .expect("Condition is in the schema");
    let values = conditions
        .iter()
        .map(|c| {
            let mut m = DynamicMessage::new(desc.clone());
            m.transcode_from(c)
                .expect("a Condition encodes as a Condition");
            ProtoValue::Message(m)
        })
        .collect();
    status.set_field_by_name("conditions", ProtoValue::List(values));
}

/// Applies a status patch to the current object.
fn patch_status(
    current: &Object,
    incoming: &Object,
    fields: &[String],
    conditions: &[v1::Condition],
) -> Result<Object, Error> {
    let kind = current.kind();
    let status_field = kind
        .descriptor()
        .get_field_by_name("status")
        .expect("every kind has a status");
    let prost_reflect::Kind::Message(status_desc) = status_field.kind() else {
        unreachable!("status is a message")
    };
    let mut status =
        part(current, "status").unwrap_or_else(|| DynamicMessage::new(status_desc.clone()));
    let source =
        part(incoming, "status").unwrap_or_else(|| DynamicMessage::new(status_desc.clone()));
    for name in fields {
        let field = status_desc.get_field_by_json_name(name).ok_or_else(|| {
            Error::invalid(
                current.display_name(),
                format!("status.{name}"),
                "no such status field",
            )
        })?;
        if source.has_field(&field) {
            status.set_field(&field, source.get_field(&field).into_owned());
        } else {
            status.clear_field(&field);
        }
    }
    if !conditions.is_empty() {
        let mut merged = conditions_of(&status)?;
        let generation = current.metadata().map(|m| m.generation).unwrap_or_default();
        merge_conditions(&mut merged, conditions, generation);
        set_conditions(&mut status, &merged);
    }
    Ok(with_part(current, "status", Some(status)))
}

// ---------------------------------------------------------------------------------------
// The service.

type Reply<T> = Result<Response<T>, Status>;

impl ApiServer {
    async fn do_apply(
        &self,
        who: &Identity,
        request: v1::ApplyRequest,
    ) -> Result<v1::ApplyResponse, Error> {
        use v1::apply_response::Outcome;
        let object = Object::try_from(request.object.unwrap_or_default())?;
        let manager = if request.manager.is_empty() {
            "default".to_owned()
        } else {
            request.manager
        };
        let mut applied = admit(object);
        validation::apply_defaults(&mut applied);
        validation::validate_create(&applied)?;
        let kind = applied.kind();
        let key = Key {
            kind,
            project: applied.project().to_owned(),
            name: applied.name().to_owned(),
        };

        for _ in 0..MAX_RETRIES {
            match self.get_kv(&key.store_key()).await? {
                None => {
                    self.authorizer
                        .authorize(who, &auth::Request::new(Verb::Create, kind, &key.name))?;
                    let mut new = prepare_new(applied.clone())?;
                    self.check_references(&new, None).await?;
                    let (labels, annotations) = {
                        let m = new.metadata_mut();
                        (m.labels.clone(), m.annotations.clone())
                    };
                    record_manager(new.metadata_mut(), &manager, &labels, &annotations);
                    if request.dry_run {
                        self.quota().check(None, &new).await?;
                        return Ok(v1::ApplyResponse {
                            object: Some(new.into()),
                            outcome: Outcome::Created as i32,
                        });
                    }
                    if let Some(created) = self.insert(new).await? {
                        return Ok(v1::ApplyResponse {
                            object: Some(created.into()),
                            outcome: Outcome::Created as i32,
                        });
                    }
                }
                Some(kv) => {
                    let current = decode_kv(kind, &kv)?;
                    self.authorizer
                        .authorize(who, &auth::Request::new(Verb::Update, kind, &key.name))?;
                    let next = apply_over(&current, &applied, &manager);
                    if next == current {
                        return Ok(v1::ApplyResponse {
                            object: Some(current.into()),
                            outcome: Outcome::Unchanged as i32,
                        });
                    }
                    if is_deleting(&current) {
                        return Err(Error::FailedPrecondition {
                            object: key.display(),
                            message: "is being deleted; it cannot be changed".into(),
                        });
                    }
                    validation::validate_update(&next, &current)?;
                    self.check_references(&next, Some(&current)).await?;
                    if request.dry_run {
                        self.quota().check(Some(&current), &next).await?;
                        return Ok(v1::ApplyResponse {
                            object: Some(next.into()),
                            outcome: Outcome::Configured as i32,
                        });
                    }
                    if let Some(written) = self
                        .swap(kv.mod_revision, &Change::Put(next), None, Some(&current))
                        .await?
                    {
                        return Ok(v1::ApplyResponse {
                            object: Some(written.into()),
                            outcome: Outcome::Configured as i32,
                        });
                    }
                }
            }
        }
        Err(Error::Unavailable {
            message: format!("{}: too many concurrent writers; retry", key.display()),
        })
    }

    pub(crate) async fn do_create(
        &self,
        who: &Identity,
        request: v1::CreateRequest,
    ) -> Result<Object, Error> {
        let object = Object::try_from(request.object.unwrap_or_default())?;
        let mut object = admit(object);
        validation::apply_defaults(&mut object);
        self.authorizer.authorize(
            who,
            &auth::Request::new(Verb::Create, object.kind(), object.name()),
        )?;
        let new = prepare_new(object)?;
        self.check_references(&new, None).await?;
        if request.dry_run {
            self.quota().check(None, &new).await?;
            return Ok(new);
        }
        let display = new.display_name();
        self.insert(new)
            .await?
            .ok_or(Error::AlreadyExists { object: display })
    }

    async fn do_update(&self, who: &Identity, request: v1::UpdateRequest) -> Result<Object, Error> {
        let object = Object::try_from(request.object.unwrap_or_default())?;
        let expected = object
            .metadata()
            .map(|m| m.resource_version)
            .unwrap_or_default();
        let mut wanted = admit(object);
        validation::apply_defaults(&mut wanted);
        let kind = wanted.kind();
        let key = Key {
            kind,
            project: wanted.project().to_owned(),
            name: wanted.name().to_owned(),
        };
        let reporter = event_reporter(&wanted);
        self.authorizer.authorize(
            who,
            &auth::Request {
                reporter: reporter.as_deref(),
                ..auth::Request::new(Verb::Update, kind, &key.name)
            },
        )?;
        let dry_run = request.dry_run;
        let display = key.display();
        let mut final_object = None;
        // Read before the read-modify-write, whose decisions cannot wait on the store.
        let others = self.others_for(&wanted).await?;
        let (object, _, _) = self
            .modify(&key, |current| {
                if kind == Kind::Event {
                    // Who may bump an Event depends on who reported it: check the stored one.
                    let stored = event_reporter(&current).filter(|r| Some(r) == reporter.as_ref());
                    self.authorizer.authorize(
                        who,
                        &auth::Request {
                            reporter: stored.as_deref(),
                            ..auth::Request::new(Verb::Update, kind, &key.name)
                        },
                    )?;
                }
                let current_rv = current.metadata().map(|m| m.resource_version).unwrap_or_default();
                if expected != 0 && expected != current_rv {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!(
                            "resourceVersion {expected} is stale (now {current_rv}); read the object again and retry"
                        ),
                    });
                }
                let mut next = current.clone();
                next.set_spec_from(&wanted);
                let w = wanted.metadata().cloned().unwrap_or_default();
                let deleting = is_deleting(&current);
                {
                    let meta = next.metadata_mut();
                    if deleting && w.finalizers.iter().any(|f| !meta.finalizers.contains(f)) {
                        return Err(Error::FailedPrecondition {
                            object: display.clone(),
                            message: "is being deleted; no finalizer can be added".into(),
                        });
                    }
                    meta.labels = w.labels;
                    meta.annotations = w.annotations;
                    meta.finalizers = w.finalizers;
                    meta.owner_references = w.owner_references;
                }
                if !spec_equal(&current, &next) {
                    if deleting {
                        return Err(Error::FailedPrecondition {
                            object: display.clone(),
                            message: "is being deleted; its spec cannot change".into(),
                        });
                    }
                    meta_generation_bump(&mut next);
                }
                if next == current {
                    return Ok(Change::Unchanged(current));
                }
                validation::validate_update(&next, &current)?;
                if let Some(others) = &others
                    && !spec_equal(&current, &next)
                {
                    validation::validate_references(&next, others)?;
                }
                if dry_run {
                    final_object = Some(next.clone());
                    return Ok(Change::Unchanged(current));
                }
                if deleting && next.metadata().is_some_and(|m| m.finalizers.is_empty()) {
                    return Ok(Change::Remove(next));
                }
                Ok(Change::Put(next))
            })
            .await?;
        Ok(final_object.unwrap_or(object))
    }

    pub(crate) async fn do_update_status(
        &self,
        who: &Identity,
        request: v1::UpdateStatusRequest,
    ) -> Result<Object, Error> {
        let key = Key::from_proto(request.key)?;
        let incoming = match request.object {
            Some(o) => Object::try_from(o)?,
            None => Object::decode(key.kind, &[]).map_err(Error::internal)?,
        };
        if incoming.kind() != key.kind {
            return Err(Error::invalid(
                key.display(),
                "object",
                format!("is a {}, not a {}", incoming.kind(), key.kind),
            ));
        }
        let condition_types: Vec<&str> = request
            .conditions
            .iter()
            .map(|c| c.r#type.as_str())
            .collect();
        if let Some(bad) = request
            .conditions
            .iter()
            .find(|c| c.r#type.is_empty() || c.status == 0)
        {
            return Err(Error::invalid(
                key.display(),
                "conditions",
                format!("{bad:?}: type and status are required"),
            ));
        }
        owners::check(
            key.kind,
            &key.display(),
            &request.writer,
            &request.fields,
            &condition_types,
        )?;
        let display = key.display();
        let (object, _, _) = self
            .modify(&key, |current| {
                let bound = node_of(&current);
                let next = patch_status(&current, &incoming, &request.fields, &request.conditions)?;
                let next_node = node_of(&next);
                let access = auth::Request {
                    verb: Verb::UpdateStatus,
                    kind: key.kind,
                    name: &key.name,
                    bound_node: bound.as_deref(),
                    writer: Some(&request.writer),
                    next_node: next_node.as_deref(),
                    finalizers_only: None,
                    reporter: None,
                };
                self.authorizer.authorize(who, &access)?;
                let rv = current
                    .metadata()
                    .map(|m| m.resource_version)
                    .unwrap_or_default();
                if request.resource_version != 0 && request.resource_version != rv {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!(
                            "resourceVersion {} is stale (now {rv})",
                            request.resource_version
                        ),
                    });
                }
                Ok(if next == current {
                    Change::Unchanged(current)
                } else {
                    Change::Put(next)
                })
            })
            .await?;
        Ok(object)
    }

    async fn do_patch_metadata(
        &self,
        who: &Identity,
        request: v1::PatchMetadataRequest,
    ) -> Result<Object, Error> {
        let key = Key::from_proto(request.key.clone())?;
        let display = key.display();
        let finalizers_only = request.set_labels.is_empty()
            && request.remove_labels.is_empty()
            && request.set_annotations.is_empty()
            && request.remove_annotations.is_empty()
            && request.add_owner_references.is_empty()
            && request.remove_owner_uids.is_empty();
        let touched: Vec<String> = request
            .add_finalizers
            .iter()
            .chain(&request.remove_finalizers)
            .cloned()
            .collect();
        let (object, _, _) = self
            .modify(&key, |current| {
                let bound = node_of(&current);
                let access = auth::Request {
                    verb: Verb::PatchMetadata,
                    kind: key.kind,
                    name: &key.name,
                    bound_node: bound.as_deref(),
                    writer: None,
                    next_node: None,
                    finalizers_only: finalizers_only.then_some(touched.as_slice()),
                    reporter: None,
                };
                self.authorizer.authorize(who, &access)?;
                let rv = current
                    .metadata()
                    .map(|m| m.resource_version)
                    .unwrap_or_default();
                if request.resource_version != 0 && request.resource_version != rv {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!(
                            "resourceVersion {} is stale (now {rv})",
                            request.resource_version
                        ),
                    });
                }
                let deleting = is_deleting(&current);
                let mut next = current.clone();
                let meta = next.metadata_mut();
                for f in &request.add_finalizers {
                    if !meta.finalizers.contains(f) {
                        if deleting {
                            return Err(Error::FailedPrecondition {
                                object: display.clone(),
                                message: format!("is being deleted; finalizer {f} cannot be added"),
                            });
                        }
                        meta.finalizers.push(f.clone());
                    }
                }
                meta.finalizers
                    .retain(|f| !request.remove_finalizers.contains(f));
                meta.labels.extend(request.set_labels.clone());
                meta.labels
                    .retain(|k, _| !request.remove_labels.contains(k));
                meta.annotations.extend(request.set_annotations.clone());
                meta.annotations
                    .retain(|k, _| !request.remove_annotations.contains(k));
                for owner in &request.add_owner_references {
                    if !meta.owner_references.iter().any(|o| o.uid == owner.uid) {
                        meta.owner_references.push(owner.clone());
                    }
                }
                meta.owner_references
                    .retain(|o| !request.remove_owner_uids.contains(&o.uid));
                if next == current {
                    return Ok(Change::Unchanged(current));
                }
                validation::validate_update(&next, &current)?;
                if deleting && next.metadata().is_some_and(|m| m.finalizers.is_empty()) {
                    return Ok(Change::Remove(next));
                }
                Ok(Change::Put(next))
            })
            .await?;
        Ok(object)
    }

    async fn do_bind(&self, who: &Identity, request: v1::BindRequest) -> Result<Object, Error> {
        let key = Key {
            kind: Kind::Server,
            project: scoped_project(Kind::Server, &request.project),
            name: request.name,
        };
        let display = key.display();
        self.authorizer.authorize(
            who,
            &auth::Request::new(Verb::Bind, Kind::Server, &key.name),
        )?;
        if request.node.is_empty() {
            return Err(Error::invalid(display, "node", "required"));
        }
        let flavor = request
            .flavor
            .ok_or_else(|| Error::invalid(display.clone(), "flavor", "required"))?;
        // A cordon is a guarantee, not a hint: a scheduler whose cache has not seen it yet
        // is refused here, and decides again once it has. The bind's write requires the
        // Node unchanged since this check.
        let node_key = Key {
            kind: Kind::Node,
            project: String::new(),
            name: request.node.clone(),
        };
        let mut check_node = |node: Option<&Object>| match node {
            None => Err(Error::invalid(
                display.clone(),
                "node",
                format!("nodes/{} not found", request.node),
            )),
            Some(Object::Node(node)) if node.spec.as_ref().is_some_and(|s| s.unschedulable) => {
                Err(Error::FailedPrecondition {
                    object: display.clone(),
                    message: format!(
                        "node {} is cordoned (unschedulable); it takes no new servers",
                        request.node
                    ),
                })
            }
            Some(_) => Ok(()),
        };
        let (object, _, _) = self
            .modify_given(&key, Some((&node_key, &mut check_node)), |current| {
                let Object::Server(server) = &current else {
                    unreachable!("the key is a server's")
                };
                let meta = server.metadata.clone().unwrap_or_default();
                if !request.uid.is_empty() && request.uid != meta.uid {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!("uid is {}, not {}", meta.uid, request.uid),
                    });
                }
                if meta.deletion_timestamp.is_some() {
                    return Err(Error::FailedPrecondition {
                        object: display.clone(),
                        message: "is being deleted".into(),
                    });
                }
                let status = server.status.clone().unwrap_or_default();
                if !status.node.is_empty() {
                    if status.node == request.node && status.flavor.as_ref() == Some(&flavor) {
                        return Ok(Change::Unchanged(current));
                    }
                    return Err(Error::FailedPrecondition {
                        object: display.clone(),
                        message: format!("is already bound to node {}", status.node),
                    });
                }
                let mut server = server.clone();
                let status = server.status.get_or_insert_with(Default::default);
                status.node = request.node.clone();
                status.flavor = Some(flavor.clone());
                // The binding says so itself, as a Kubernetes binding sets PodScheduled:
                // one write instead of a bind and a status write after it.
                merge_conditions(
                    &mut status.conditions,
                    &[scheduled_condition(&request.node)],
                    meta.generation,
                );
                let meta = server.metadata.get_or_insert_with(Default::default);
                if !meta.finalizers.iter().any(|f| f == auth::AGENT_FINALIZER) {
                    meta.finalizers.push(auth::AGENT_FINALIZER.to_owned());
                }
                Ok(Change::Put(Object::Server(server)))
            })
            .await?;
        Ok(object)
    }

    async fn do_delete(
        &self,
        who: &Identity,
        request: v1::DeleteRequest,
    ) -> Result<v1::DeleteResponse, Error> {
        use v1::delete_request::Propagation;
        let key = Key::from_proto(request.key)?;
        self.authorizer
            .authorize(who, &auth::Request::new(Verb::Delete, key.kind, &key.name))?;
        let display = key.display();
        let propagation =
            Propagation::try_from(request.propagation).unwrap_or(Propagation::Background);
        let leaving = if key.kind == Kind::Volume {
            self.refuse_deleting_with_snapshots(&key, &display).await?;
            self.leaving_servers(&key).await?
        } else {
            BTreeSet::new()
        };
        let (object, _, removed) = self
            .modify(&key, |current| {
                let meta = current.metadata().cloned().unwrap_or_default();
                if !request.precondition_uid.is_empty() && request.precondition_uid != meta.uid {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!("uid is {}, not {}", meta.uid, request.precondition_uid),
                    });
                }
                if request.precondition_resource_version != 0
                    && request.precondition_resource_version != meta.resource_version
                {
                    return Err(Error::Conflict {
                        object: display.clone(),
                        message: format!(
                            "resourceVersion is {}, not {}",
                            meta.resource_version, request.precondition_resource_version
                        ),
                    });
                }
                if meta.deletion_timestamp.is_some() {
                    return Ok(Change::Unchanged(current));
                }
                refuse_deleting_in_use(&current, &leaving, &display)?;
                let mut next = current.clone();
                let next_meta = next.metadata_mut();
                let extra = match propagation {
                    Propagation::Foreground => Some(FOREGROUND_FINALIZER),
                    Propagation::Orphan => Some(ORPHAN_FINALIZER),
                    _ => None,
                };
                if let Some(f) = extra
                    && !next_meta.finalizers.iter().any(|x| x == f)
                {
                    next_meta.finalizers.push(f.to_owned());
                }
                if next_meta.finalizers.is_empty() {
                    return Ok(if request.dry_run {
                        Change::Unchanged(next)
                    } else {
                        Change::Remove(next)
                    });
                }
                next_meta.deletion_timestamp = Some(now());
                Ok(if request.dry_run {
                    Change::Unchanged(next)
                } else {
                    Change::Put(next)
                })
            })
            .await?;
        let gone = removed
            || (request.dry_run && object.metadata().is_some_and(|m| m.finalizers.is_empty()));
        Ok(v1::DeleteResponse {
            object: Some(object.into()),
            gone,
        })
    }

    async fn do_get(&self, who: &Identity, request: v1::GetRequest) -> Result<Object, Error> {
        let key = Key::from_proto(request.key)?;
        self.authorizer
            .authorize(who, &auth::Request::new(Verb::Read, key.kind, &key.name))?;
        Ok(self.read(&key).await?.0)
    }

    pub(crate) async fn do_list(
        &self,
        who: &Identity,
        request: v1::ListRequest,
    ) -> Result<v1::ListResponse, Error> {
        let kind = parse_kind(&request.kind)?;
        self.authorizer
            .authorize(who, &auth::Request::new(Verb::Read, kind, ""))?;
        let labels = LabelSelector::parse(&request.label_selector)?;
        let fields = FieldSelector::parse(&request.field_selector)?;
        let prefix = if request.all_projects || kind.scope() == Scope::Cluster {
            kind.prefix(None)
        } else {
            kind.prefix(Some(&scoped_project(kind, &request.project)))
        };
        let limit = match request.limit as usize {
            0 => self.limits.default_page_size,
            n => n.min(self.limits.max_page_size),
        };
        let (mut revision, mut start) = (None, prefix.clone());
        if !request.continue_token.is_empty() {
            let (rev, key) = request
                .continue_token
                .split_once('/')
                .and_then(|(r, k)| Some((r.parse::<Revision>().ok()?, k)))
                .filter(|(_, k)| k.starts_with(&prefix))
                .ok_or_else(|| {
                    Error::invalid("", "continueToken", "not a token this list returned")
                })?;
            revision = Some(rev);
            start = key.to_owned();
        }
        if request.continue_token.is_empty()
            && let Some(cache) = &self.cache
        {
            let query = Query {
                project: (!request.all_projects && kind.scope() == Scope::Project)
                    .then(|| scoped_project(kind, &request.project)),
                labels: labels.clone(),
                fields: fields.clone(),
            };
            if let Some(page) = cache
                .list(kind, &query, limit, self.limits.max_page_bytes)
                .await
            {
                return Ok(v1::ListResponse {
                    items: page
                        .items
                        .iter()
                        .map(|o| v1::AnyObject::from((**o).clone()))
                        .collect(),
                    continue_token: page
                        .next_key
                        .map(|k| format!("{}/{k}", page.revision))
                        .unwrap_or_default(),
                    resource_version: page.revision,
                });
            }
        }
        let end = prefix_end(&prefix);
        let mut items = Vec::new();
        let mut bytes = 0usize;
        loop {
            let range = RangeRequest {
                range: KeyRange::Between {
                    start: start.clone(),
                    end: end.clone(),
                },
                revision,
                limit: limit.max(64),
                keys_only: false,
            };
            let page = self.store.range(range).await.map_err(store_error)?;
            revision = Some(page.revision);
            let mut stopped_at = None;
            for kv in &page.kvs {
                if items.len() >= limit || bytes >= self.limits.max_page_bytes {
                    stopped_at = Some(kv.key.clone());
                    break;
                }
                let object = decode_kv(kind, kv)?;
                if labels.matches(
                    &object
                        .metadata()
                        .map(|m| m.labels.clone())
                        .unwrap_or_default(),
                ) && fields.matches(&object)
                {
                    bytes += kv.value.len();
                    items.push(v1::AnyObject::from(object));
                }
            }
            let revision = revision.unwrap_or_default();
            if let Some(next) = stopped_at {
                return Ok(v1::ListResponse {
                    items,
                    continue_token: format!("{revision}/{next}"),
                    resource_version: revision,
                });
            }
            match page.kvs.last() {
                Some(last) if page.more => start = format!("{}\0", last.key),
                _ => {
                    return Ok(v1::ListResponse {
                        items,
                        continue_token: String::new(),
                        resource_version: revision,
                    });
                }
            }
        }
    }

    async fn do_watch(
        &self,
        who: &Identity,
        request: v1::WatchRequest,
    ) -> Result<EncodedStream, Error> {
        if !request.send_initial_events {
            return self.watch_changes(who, request).await;
        }
        self.watch_list(who, request).await
    }

    /// A Watch with `sendInitialEvents`: every object that matches now as an Added event,
    /// a Bookmark at the revision they were read at, then the changes after it. The
    /// objects are read (page by page, at one revision) and the watch opened before the
    /// first event is sent, so a failure of either is the call's error.
    async fn watch_list(
        &self,
        who: &Identity,
        request: v1::WatchRequest,
    ) -> Result<EncodedStream, Error> {
        if request.resource_version != 0 {
            return Err(Error::invalid(
                "",
                "resourceVersion",
                "sendInitialEvents sends what exists now; leave resourceVersion at 0",
            ));
        }
        let mut list = v1::ListRequest {
            kind: request.kind.clone(),
            project: request.project.clone(),
            all_projects: request.all_projects,
            label_selector: request.label_selector.clone(),
            field_selector: request.field_selector.clone(),
            limit: 0,
            continue_token: String::new(),
        };
        let mut page = self.do_list(who, list.clone()).await?;
        let revision = page.resource_version;
        let mut items = std::mem::take(&mut page.items);
        while !page.continue_token.is_empty() {
            list.continue_token = std::mem::take(&mut page.continue_token);
            page = self.do_list(who, list.clone()).await?;
            items.append(&mut page.items);
        }
        let changes = self
            .watch_changes(
                who,
                v1::WatchRequest {
                    resource_version: revision,
                    send_initial_events: false,
                    ..request
                },
            )
            .await?;
        let mut initial = Vec::with_capacity(items.len() + 1);
        for item in items {
            let object = Object::try_from(item)?;
            let resource_version = object
                .metadata()
                .map(|m| m.resource_version)
                .unwrap_or(revision);
            initial.push(Ok::<_, Status>(EncodedEvent::new(&v1::WatchEvent {
                r#type: v1::watch_event::Type::Added as i32,
                object: Some(object.into()),
                resource_version,
            })));
        }
        initial.push(Ok(EncodedEvent::new(&v1::WatchEvent {
            r#type: v1::watch_event::Type::Bookmark as i32,
            object: None,
            resource_version: revision,
        })));
        Ok(Box::pin(futures::stream::iter(initial).chain(changes)))
    }

    /// A Watch of the changes after `request.resource_version` (0: from now).
    async fn watch_changes(
        &self,
        who: &Identity,
        request: v1::WatchRequest,
    ) -> Result<EncodedStream, Error> {
        let kind = parse_kind(&request.kind)?;
        self.authorizer
            .authorize(who, &auth::Request::new(Verb::Read, kind, ""))?;
        let labels = LabelSelector::parse(&request.label_selector)?;
        let fields = FieldSelector::parse(&request.field_selector)?;
        let prefix = if request.all_projects || kind.scope() == Scope::Cluster {
            kind.prefix(None)
        } else {
            kind.prefix(Some(&scoped_project(kind, &request.project)))
        };
        if let Some(cache) = &self.cache {
            let query = Query {
                project: (!request.all_projects && kind.scope() == Scope::Project)
                    .then(|| scoped_project(kind, &request.project)),
                labels: labels.clone(),
                fields: fields.clone(),
            };
            if let Some(watch) = cache.watch(kind, query, request.resource_version) {
                return Ok(Box::pin(watch.into_stream()));
            }
        }
        self.watch_store(kind, prefix, labels, fields, request.resource_version)
            .await
    }

    /// A watch served from the store directly (no cache, or a revision older than its
    /// window): one store watch for this watcher, each event encoded for it alone.
    async fn watch_store(
        &self,
        kind: Kind,
        prefix: String,
        labels: LabelSelector,
        fields: FieldSelector,
        resource_version: Revision,
    ) -> Result<EncodedStream, Error> {
        let from = if resource_version > 0 {
            resource_version
        } else {
            self.store.current_revision().await.map_err(store_error)?
        };
        let mut events = self
            .store
            .watch(StoreWatch {
                range: KeyRange::Prefix(prefix),
                start_revision: Some(from + 1),
                // Deletions and selector transitions are told from the previous value.
                prev_values: true,
            })
            .await
            .map_err(store_error)?;
        let (tx, rx) = mpsc::channel::<Result<EncodedEvent, Status>>(256);
        let interval = self.limits.bookmark_interval;
        tokio::spawn(async move {
            let mut last = from;
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            let matches = |o: &Object| {
                labels.matches(&o.metadata().map(|m| m.labels.clone()).unwrap_or_default())
                    && fields.matches(o)
            };
            loop {
                let batch = tokio::select! {
                    batch = events.next() => batch,
                    _ = ticker.tick() => {
                        let bookmark = EncodedEvent::new(&v1::WatchEvent {
                            r#type: v1::watch_event::Type::Bookmark as i32,
                            object: None,
                            resource_version: last,
                        });
                        if tx.send(Ok(bookmark)).await.is_err() { return; }
                        continue;
                    }
                    _ = tx.closed() => return,
                };
                let batch = match batch {
                    Some(Ok(batch)) => batch,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::from(store_error(e)))).await;
                        return;
                    }
                    None => return,
                };
                for event in &batch.events {
                    match translate(kind, event, &matches) {
                        Ok(Some(out)) => {
                            if tx.send(Ok(EncodedEvent::new(&out))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    }
                    last = last.max(event.kv.mod_revision);
                }
                // On etcd a batch with events may be followed by events at revisions below
                // its header revision; only an empty (progress) batch proves everything up to
                // its revision was delivered.
                if batch.events.is_empty() {
                    last = last.max(batch.revision);
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// Turns a store event into the event a watcher with these selectors sees: an object that
/// starts matching is Added, one that stops matching is Deleted.
fn translate(
    kind: Kind,
    event: &ferro_store::WatchEvent,
    matches: &impl Fn(&Object) -> bool,
) -> Result<Option<v1::WatchEvent>, Error> {
    use v1::watch_event::Type;
    let before = event
        .prev
        .as_ref()
        .map(|kv| decode_kv(kind, kv))
        .transpose()?;
    let was = before.as_ref().is_some_and(matches);
    let revision = event.kv.mod_revision;
    let (kind_of_event, object) = match event.kind {
        ferro_store::EventKind::Put => {
            let after = decode_kv(kind, &event.kv)?;
            match (was, matches(&after)) {
                (true, true) => (Type::Modified, after),
                (false, true) => (Type::Added, after),
                (true, false) => (Type::Deleted, after),
                (false, false) => return Ok(None),
            }
        }
        ferro_store::EventKind::Delete => match before {
            Some(mut before) if was => {
                before.metadata_mut().resource_version = revision;
                (Type::Deleted, before)
            }
            _ => return Ok(None),
        },
    };
    Ok(Some(v1::WatchEvent {
        r#type: kind_of_event as i32,
        object: Some(object.into()),
        resource_version: revision,
    }))
}

/// The first key after every key with this prefix.
pub(crate) fn prefix_end(prefix: &str) -> String {
    // Keys are `/ferro/<plural>/...`; every prefix ends in '/', and '0' sorts right after it.
    let mut end = prefix.to_owned();
    if end.pop() == Some('/') {
        end.push('0');
    } else {
        end.push('\u{10FFFF}');
    }
    end
}

/// The stream of events a Watch returns.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

fn reply<T>(result: Result<T, Error>) -> Reply<T> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Resources for ApiServer {
    async fn apply(&self, request: Request<v1::ApplyRequest>) -> Reply<v1::ApplyResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(self.do_apply(&who, request.into_inner()).await)
    }

    async fn create(&self, request: Request<v1::CreateRequest>) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_create(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_get(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn list(&self, request: Request<v1::ListRequest>) -> Reply<v1::ListResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(self.do_list(&who, request.into_inner()).await)
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Reply<Self::WatchStream> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_watch(&who, request.into_inner())
                .await
                .map(crate::encoded::decoded),
        )
    }

    async fn update(&self, request: Request<v1::UpdateRequest>) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_update(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn update_status(
        &self,
        request: Request<v1::UpdateStatusRequest>,
    ) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_update_status(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn patch_metadata(
        &self,
        request: Request<v1::PatchMetadataRequest>,
    ) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_patch_metadata(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn bind(&self, request: Request<v1::BindRequest>) -> Reply<v1::ObjectResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(
            self.do_bind(&who, request.into_inner())
                .await
                .map(object_response),
        )
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Reply<v1::DeleteResponse> {
        let who = self.identity(&request).map_err(Status::from)?;
        reply(self.do_delete(&who, request.into_inner()).await)
    }
}

/// An Event's `reportingComponent`; `None` for other kinds.
fn event_reporter(object: &Object) -> Option<String> {
    match object {
        Object::Event(e) => e.spec.as_ref().map(|s| s.reporting_component.clone()),
        _ => None,
    }
}

pub(crate) fn object_response(object: Object) -> v1::ObjectResponse {
    v1::ObjectResponse {
        object: Some(object.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_owned_removes_only_the_managers_keys() {
        let current: HashMap<String, String> = [("a", "1"), ("b", "2"), ("other", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let applied: HashMap<String, String> = [("a", "9")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let merged = merge_owned(&current, &applied, &["a".into(), "b".into()]);
        assert_eq!(merged.get("a").map(String::as_str), Some("9"));
        assert!(
            !merged.contains_key("b"),
            "b was the manager's and is no longer sent"
        );
        assert_eq!(
            merged.get("other").map(String::as_str),
            Some("x"),
            "another manager's key stays"
        );
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        let end = prefix_end("/ferro/servers/p1/");
        assert!("/ferro/servers/p1/zzz" < end.as_str());
        assert!(
            "/ferro/servers/p10/a" > end.as_str()
                || !"/ferro/servers/p10/a".starts_with("/ferro/servers/p1/")
        );
        assert!("/ferro/servers/p2/a" > end.as_str());
    }

    #[test]
    fn conditions_keep_their_transition_time_when_status_holds() {
        let t0 = prost_types::Timestamp {
            seconds: 100,
            nanos: 0,
        };
        let mut existing = vec![v1::Condition {
            r#type: "Ready".into(),
            status: v1::condition::Status::True as i32,
            last_transition_time: Some(t0),
            ..Default::default()
        }];
        let same = v1::Condition {
            r#type: "Ready".into(),
            status: v1::condition::Status::True as i32,
            reason: "Fine".into(),
            ..Default::default()
        };
        merge_conditions(&mut existing, &[same], 3);
        assert_eq!(existing[0].last_transition_time, Some(t0));
        assert_eq!(existing[0].reason, "Fine");
        assert_eq!(existing[0].observed_generation, 3);
        let flipped = v1::Condition {
            r#type: "Ready".into(),
            status: v1::condition::Status::False as i32,
            ..Default::default()
        };
        merge_conditions(&mut existing, &[flipped], 3);
        assert_ne!(existing[0].last_transition_time, Some(t0));
    }
}
