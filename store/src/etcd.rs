//! The etcd backend: [`Store`] over etcd's v3 gRPC API, through `etcd-client`.
//!
//! Every store call is one etcd call. etcd's errors carry no details, so when one needs them
//! (the compaction point of a [`StoreError::Compacted`], the current revision of a
//! [`StoreError::FutureRevision`], which lease of a transaction is missing) a follow-up query
//! fills them in; those errors are rare and the follow-up is cheap. If the follow-up itself
//! fails, the error keeps its kind and reports the closest bound it knows.
//!
//! Puts and deletes always ask for the previous values and watches always for previous
//! values of events, so responses carry what the [`Store`] contract promises. Watches map one
//! etcd watch response to one [`WatchBatch`], skip the "created" acknowledgement, and end
//! with an error rather than quietly: a compacted start revision (or a watcher etcd dropped
//! for lagging behind a compaction) ends with [`StoreError::Compacted`], anything else with
//! [`StoreError::Unavailable`].
//!
//! The client is a set of `tonic` channels; cloning an [`EtcdStore`] is cheap and shares them.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, GetOptions, KvClient, LeaseClient, PutOptions,
    WatchClient, WatchOptions,
};
use futures::StreamExt;

use crate::{
    CompareOp, CompareTarget, EventKind, KeyRange, KeyValue, LeaseId, ProgressRequester,
    RangeRequest, RangeResponse, Revision, Store, StoreError, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchBatch, WatchEvent, WatchRequest, WatchStream, ttl_seconds,
};

/// How long to wait for a TCP connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may wait for etcd's answer. Long enough for a leader election (etcd
/// itself gives up on a proposal after about 7 s with default timing), short enough that a
/// wedged member does not hang its callers. For watches it bounds only the set-up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings on idle connections, so a watch on a vanished member ends instead of hanging.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// gRPC's default 4 MiB cap on a response is smaller than a list of a few thousand objects;
/// etcd itself does not cap what it sends.
const MAX_RESPONSE_BYTES: usize = 1 << 30;
/// How long the compaction-point probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A key nobody writes: the probes below read and watch it for their response headers.
const PROBE_KEY: &[u8] = b"\0";

/// A [`Store`] backed by an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to an etcd cluster through the given client URLs (`http://127.0.0.1:2379`).
    ///
    /// Connections are made lazily and re-made as needed: this fails only on malformed
    /// endpoints, and an unreachable cluster shows as [`StoreError::Unavailable`] on the
    /// first call. Requests require a leader, so a member cut off from its quorum answers
    /// `Unavailable` instead of serving stale data or keeping a watch silently stuck.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(plain_error)?;
        Ok(Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
        })
    }

    /// Turns an etcd error into a store error, querying etcd for the details it left out.
    /// `revisions` are the revisions the failed request asked for; `leases` the leases it
    /// attached keys to.
    async fn explain(
        &self,
        error: etcd_client::Error,
        revisions: &[Revision],
        leases: &[LeaseId],
    ) -> StoreError {
        match classify(error) {
            Failure::Compacted => {
                let requested = revisions.iter().copied().min().unwrap_or_default();
                // The compaction point is above the revision asked for.
                let compacted = self.compaction_point().await.unwrap_or(requested + 1);
                StoreError::Compacted {
                    requested,
                    compacted,
                }
            }
            Failure::FutureRevision => {
                let requested = revisions.iter().copied().max().unwrap_or_default();
                let current = self.current_revision().await.unwrap_or(requested - 1);
                StoreError::FutureRevision { requested, current }
            }
            Failure::LeaseNotFound => StoreError::LeaseNotFound(self.missing_lease(leases).await),
            Failure::Other(error) => error,
        }
    }

    /// etcd's compaction point. It reports it only to a watch that starts below it, so
    /// start one at revision 1 and read the cancellation.
    async fn compaction_point(&self) -> Option<Revision> {
        let probe = async {
            let options = WatchOptions::new().with_start_revision(1);
            let mut stream = self
                .watch
                .clone()
                .watch(PROBE_KEY, Some(options))
                .await
                .ok()?;
            while let Some(response) = stream.message().await.ok()? {
                if response.compact_revision() > 0 {
                    return Some(response.compact_revision());
                }
                if response.canceled() || !response.events().is_empty() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .ok()
            .flatten()
    }

    /// The first of `leases` etcd no longer knows; the first of them if it cannot tell.
    async fn missing_lease(&self, leases: &[LeaseId]) -> LeaseId {
        for &lease in leases {
            let answer = self.lease.clone().time_to_live(lease, None).await;
            if answer.map_or(true, |ttl| ttl.ttl() < 0) {
                return lease;
            }
        }
        leases.first().copied().unwrap_or_default()
    }
}

/// What an etcd error means for the store.
enum Failure {
    Compacted,
    FutureRevision,
    LeaseNotFound,
    Other(StoreError),
}

fn classify(error: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::GRpcStatus(status) => {
            let message = status.message();
            match status.code() {
                Code::OutOfRange if message.contains("required revision has been compacted") => {
                    Failure::Compacted
                }
                Code::OutOfRange if message.contains("required revision is a future revision") => {
                    Failure::FutureRevision
                }
                Code::NotFound if message.contains("lease not found") => Failure::LeaseNotFound,
                // Malformed requests; etcd reports "too large lease TTL" as out of range.
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    Failure::Other(StoreError::InvalidArgument(strip(message).to_owned()))
                }
                // No leader, timeouts, a lost connection (which tonic may report as Unknown),
                // or a full database: all conditions to wait out or fix outside, then retry.
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Unknown
                | Code::ResourceExhausted => {
                    Failure::Other(StoreError::Unavailable(describe(&status, strip(message))))
                }
                _ => Failure::Other(StoreError::Internal(describe(&status, strip(message)))),
            }
        }
        E::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            Failure::LeaseNotFound
        }
        E::TransportError(e) => {
            Failure::Other(StoreError::Unavailable(describe(&e, "transport error")))
        }
        E::IoError(e) => Failure::Other(StoreError::Unavailable(describe(&e, "i/o error"))),
        E::WatchError(message) | E::LeaseKeepAliveError(message) => {
            Failure::Other(StoreError::Unavailable(message))
        }
        E::InvalidArgs(message) => Failure::Other(StoreError::InvalidArgument(message)),
        E::InvalidUri(e) => Failure::Other(StoreError::InvalidArgument(format!(
            "invalid endpoint: {e}"
        ))),
        other => Failure::Other(StoreError::Internal(other.to_string())),
    }
}

/// Maps the error of a call that names no revision and no lease, so cannot meet those
/// errors legitimately.
fn plain_error(error: etcd_client::Error) -> StoreError {
    match classify(error) {
        Failure::Other(error) => error,
        Failure::Compacted | Failure::FutureRevision | Failure::LeaseNotFound => {
            StoreError::Internal("etcd answered with a revision or lease error unasked".into())
        }
    }
}

/// etcd prefixes its messages with "etcdserver: "; our error kinds already say where they
/// come from.
fn strip(message: &str) -> &str {
    message.strip_prefix("etcdserver: ").unwrap_or(message)
}

/// `headline` followed by the causes behind `error`, which tonic keeps out of its `Display`.
fn describe(error: &dyn std::error::Error, headline: &str) -> String {
    let mut text = headline.to_owned();
    let mut cause = error.source();
    while let Some(e) = cause {
        // tonic and hyper repeat a headline at several levels of the chain; say it once.
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

/// etcd's key and range end for a range. The empty key is etcd's "no key", so the whole
/// keyspace and a range from "" start at "\0" instead: no key is empty, so none is lost.
fn etcd_range(range: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    match range {
        KeyRange::Key(key) => (key.as_bytes().to_vec(), None),
        KeyRange::Prefix(prefix) if prefix.is_empty() => (b"\0".to_vec(), Some(b"\0".to_vec())),
        KeyRange::Prefix(prefix) => (prefix.as_bytes().to_vec(), Some(prefix_end(prefix))),
        KeyRange::Between { start, end } if start.is_empty() => {
            (b"\0".to_vec(), Some(end.as_bytes().to_vec()))
        }
        KeyRange::Between { start, end } => {
            (start.as_bytes().to_vec(), Some(end.as_bytes().to_vec()))
        }
    }
}

/// The first key after every key that starts with `prefix`. UTF-8 never contains 0xff, so
/// incrementing the last byte always works.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Unreachable for UTF-8 input; "\0" is etcd's "to the end of the keyspace".
    vec![0]
}

fn get_options(request: &RangeRequest) -> (Vec<u8>, GetOptions) {
    let (key, end) = etcd_range(&request.range);
    let mut options = GetOptions::new()
        .with_limit(i64::try_from(request.limit).unwrap_or(i64::MAX))
        .with_revision(request.revision.unwrap_or_default().max(0));
    if let Some(end) = end {
        options = options.with_range(end);
    }
    if request.keys_only {
        options = options.with_keys_only();
    }
    (key, options)
}

fn etcd_op(op: TxnOp) -> etcd_client::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            let options = PutOptions::new()
                .with_prev_key()
                .with_lease(lease.unwrap_or_default());
            etcd_client::TxnOp::put(key, value, Some(options))
        }
        TxnOp::Delete(range) => {
            let (key, end) = etcd_range(&range);
            let mut options = DeleteOptions::new().with_prev_key();
            if let Some(end) = end {
                options = options.with_range(end);
            }
            etcd_client::TxnOp::delete(key, Some(options))
        }
        TxnOp::Range(request) => {
            let (key, options) = get_options(&request);
            etcd_client::TxnOp::get(key, Some(options))
        }
    }
}

fn etcd_compare(compare: crate::Compare) -> etcd_client::Compare {
    let op = match compare.op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
        CompareOp::Less => etcd_client::CompareOp::Less,
    };
    let key = compare.key;
    match compare.target {
        CompareTarget::Version(v) => etcd_client::Compare::version(key, op, v),
        CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(key, op, r),
        CompareTarget::CreateRevision(r) => etcd_client::Compare::create_revision(key, op, r),
        CompareTarget::Value(v) => etcd_client::Compare::value(key, op, v),
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv.key_str().map_err(|_| {
        StoreError::Internal(format!("etcd returned a non-UTF-8 key {:?}", kv.key()))
    })?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(etcd_client::ResponseHeader::revision)
        .ok_or_else(|| StoreError::Internal("etcd response without a header".into()))
}

fn range_response(
    response: &etcd_client::GetResponse,
    requested: Option<Revision>,
    fallback_revision: Option<Revision>,
) -> Result<RangeResponse, StoreError> {
    // etcd's header carries the revision the read saw (the latest one, or, inside a
    // transaction, the transaction's); a historic read was served at the revision asked for.
    let revision = match requested {
        Some(r) if r > 0 => r,
        _ => match (response.header(), fallback_revision) {
            (Some(header), _) => header.revision(),
            (None, Some(revision)) => revision,
            (None, None) => header_revision(None)?,
        },
    };
    Ok(RangeResponse {
        kvs: response
            .kvs()
            .iter()
            .map(key_value)
            .collect::<Result<_, _>>()?,
        more: response.more(),
        count: usize::try_from(response.count()).unwrap_or_default(),
        revision,
    })
}

/// The revisions and leases a transaction mentions, kept for explaining its errors.
fn txn_details(txn: &Txn) -> (Vec<Revision>, Vec<LeaseId>) {
    let mut revisions = Vec::new();
    let mut leases = Vec::new();
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            TxnOp::Range(RangeRequest {
                revision: Some(r), ..
            }) if *r > 0 => revisions.push(*r),
            TxnOp::Put { lease: Some(l), .. } if *l != 0 && !leases.contains(l) => leases.push(*l),
            _ => {}
        }
    }
    (revisions, leases)
}

#[async_trait]
impl Store for EtcdStore {
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        request.range.validate()?;
        let (key, options) = get_options(&request);
        match self.kv.clone().get(key, Some(options)).await {
            Ok(response) => range_response(&response, request.revision, None),
            Err(error) => {
                let revisions: Vec<Revision> = request.revision.into_iter().collect();
                Err(self.explain(error, &revisions, &[]).await)
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        // etcd would read an inverted `Between` differently; reject it as memory does.
        for op in txn.success.iter().chain(&txn.failure) {
            match op {
                TxnOp::Delete(range) => range.validate()?,
                TxnOp::Range(request) => request.range.validate()?,
                TxnOp::Put { .. } => {}
            }
        }
        let (revisions, leases) = txn_details(&txn);
        // Which revision each range asked for, per branch, to report it in the answer.
        let asked = |ops: &[TxnOp]| -> Vec<Option<Revision>> {
            ops.iter()
                .filter_map(|op| match op {
                    TxnOp::Range(request) => Some(request.revision),
                    _ => None,
                })
                .collect()
        };
        let (asked_success, asked_failure) = (asked(&txn.success), asked(&txn.failure));
        let request = etcd_client::Txn::new()
            .when(
                txn.compare
                    .into_iter()
                    .map(etcd_compare)
                    .collect::<Vec<_>>(),
            )
            .and_then(txn.success.into_iter().map(etcd_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(etcd_op).collect::<Vec<_>>());
        let response = match self.kv.clone().txn(request).await {
            Ok(response) => response,
            Err(error) => return Err(self.explain(error, &revisions, &leases).await),
        };
        let revision = header_revision(response.header())?;
        let succeeded = response.succeeded();
        let mut asked = if succeeded {
            asked_success
        } else {
            asked_failure
        }
        .into_iter();
        let responses =
            response
                .op_responses()
                .iter()
                .map(|op| match op {
                    etcd_client::TxnOpResponse::Put(put) => Ok(TxnOpResponse::Put {
                        prev: put.prev_key().map(key_value).transpose()?,
                    }),
                    etcd_client::TxnOpResponse::Delete(delete) => Ok(TxnOpResponse::Delete {
                        deleted: delete
                            .prev_kvs()
                            .iter()
                            .map(key_value)
                            .collect::<Result<_, _>>()?,
                    }),
                    etcd_client::TxnOpResponse::Get(get) => Ok(TxnOpResponse::Range(
                        range_response(get, asked.next().flatten(), Some(revision))?,
                    )),
                    etcd_client::TxnOpResponse::Txn(_) => Err(StoreError::Internal(
                        "etcd answered a nested transaction".into(),
                    )),
                })
                .collect::<Result<_, _>>()?;
        Ok(TxnResponse {
            succeeded,
            revision,
            responses,
        })
    }

    async fn watch(&self, request: WatchRequest) -> Result<WatchStream, StoreError> {
        Ok(self.watch_with_progress(request).await?.0)
    }

    async fn watch_with_progress(
        &self,
        request: WatchRequest,
    ) -> Result<(WatchStream, ProgressRequester), StoreError> {
        request.range.validate()?;
        let (key, end) = etcd_range(&request.range);
        let mut options = WatchOptions::new();
        if request.prev_values {
            options = options.with_prev_key();
        }
        if let Some(end) = end {
            options = options.with_range(end);
        }
        let start = request.start_revision.filter(|r| *r > 0);
        if let Some(start) = start {
            options = options.with_start_revision(start);
        }
        let stream = self
            .watch
            .clone()
            .watch(key, Some(options))
            .await
            .map_err(plain_error)?;
        let (sender, responses) = stream.split();
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let weak = Arc::downgrade(&sender);
        let requester = ProgressRequester::new(move || {
            let Some(sender) = weak.upgrade() else {
                return;
            };
            // etcd answers with an empty response whose header revision is current, sent
            // after every event of the watch up to it (etcd >= 3.4).
            tokio::spawn(async move {
                let _ = sender.lock().await.request_progress().await;
            });
        });
        let feed = EtcdFeed {
            _sender: sender,
            responses,
            resume_from: start,
            ended: false,
        };
        Ok((
            futures::stream::unfold(feed, EtcdFeed::next).boxed(),
            requester,
        ))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let response = self
            .lease
            .clone()
            .grant(ttl_seconds(ttl), None)
            .await
            .map_err(plain_error)?;
        if !response.error().is_empty() {
            return Err(StoreError::Internal(format!(
                "lease grant: {}",
                response.error()
            )));
        }
        Ok(response.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        // etcd-client's keep-alive consumes the first answer to check that the lease exists
        // and keeps its TTL to itself; a second round on the same stream reports the TTL.
        let mut client = self.lease.clone();
        let (mut keeper, mut answers) = client
            .keep_alive(lease)
            .await
            .map_err(|e| lease_error(e, lease))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_error(e, lease))?;
        let answer = answers
            .message()
            .await
            .map_err(|e| lease_error(e, lease))?
            .ok_or_else(|| StoreError::Unavailable("lease keep-alive stream closed".into()))?;
        match u64::try_from(answer.ttl()) {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lease
            .clone()
            .revoke(lease)
            .await
            .map_err(|e| lease_error(e, lease))?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self.kv.clone().compact(revision, None).await {
            Ok(_) => Ok(()),
            Err(error) => Err(self.explain(error, &[revision], &[]).await),
        }
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        // A linearizable read: its header carries the cluster's latest revision.
        let options = GetOptions::new().with_count_only();
        let response = self
            .kv
            .clone()
            .get(PROBE_KEY, Some(options))
            .await
            .map_err(plain_error)?;
        header_revision(response.header())
    }
}

fn lease_error(error: etcd_client::Error, lease: LeaseId) -> StoreError {
    match classify(error) {
        Failure::LeaseNotFound => StoreError::LeaseNotFound(lease),
        Failure::Other(error) => error,
        Failure::Compacted | Failure::FutureRevision => {
            StoreError::Internal("etcd answered a lease call with a revision error".into())
        }
    }
}

/// The state behind an etcd watch stream.
struct EtcdFeed {
    /// Held so etcd keeps the watch open (dropping the request side may end it), and shared
    /// with the watch's [`ProgressRequester`].
    _sender: Arc<tokio::sync::Mutex<etcd_client::WatchRequestSender>>,
    responses: etcd_client::WatchResponseStream,
    /// The first revision not yet delivered, for the compaction error's `requested`.
    resume_from: Option<Revision>,
    ended: bool,
}

impl EtcdFeed {
    async fn next(mut self) -> Option<(Result<WatchBatch, StoreError>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            let item = match self.responses.message().await {
                Err(error) => Err(plain_error(error)),
                Ok(None) => Err(StoreError::Unavailable(
                    "etcd closed the watch stream".into(),
                )),
                Ok(Some(response)) => self.batch(&response),
            };
            match item {
                Ok(None) => continue,
                Ok(Some(batch)) => return Some((Ok(batch), self)),
                Err(error) => {
                    self.ended = true;
                    return Some((Err(error), self));
                }
            }
        }
    }

    /// The batch a watch response carries; `None` for the creation acknowledgement.
    fn batch(
        &mut self,
        response: &etcd_client::WatchResponse,
    ) -> Result<Option<WatchBatch>, StoreError> {
        if response.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: self.resume_from.unwrap_or_default(),
                compacted: response.compact_revision(),
            });
        }
        if response.canceled() {
            return Err(StoreError::Unavailable(format!(
                "etcd canceled the watch: {}",
                strip(response.cancel_reason())
            )));
        }
        // The acknowledgement's header is the revision at creation, not a promise that
        // history up to it was delivered: it is no progress notice.
        if response.created() && response.events().is_empty() {
            return Ok(None);
        }
        let revision = header_revision(response.header())?;
        let events = response
            .events()
            .iter()
            .map(|event| {
                let kv = event
                    .kv()
                    .ok_or_else(|| StoreError::Internal("etcd watch event without a key".into()))?;
                let kind = match event.event_type() {
                    etcd_client::EventType::Put => EventKind::Put,
                    etcd_client::EventType::Delete => EventKind::Delete,
                };
                Ok(WatchEvent {
                    kind,
                    kv: key_value(kv)?,
                    prev: event.prev_kv().map(key_value).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if let Some(last) = events.last() {
            self.resume_from = Some(last.kv.mod_revision + 1);
        }
        Ok(Some(WatchBatch { revision, events }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_etcd_keys_and_ends() {
        assert_eq!(
            etcd_range(&KeyRange::Key("/a".into())),
            (b"/a".to_vec(), None)
        );
        assert_eq!(
            etcd_range(&KeyRange::Prefix("/ferro/servers/".into())),
            (
                b"/ferro/servers/".to_vec(),
                Some(b"/ferro/servers0".to_vec())
            )
        );
        assert_eq!(
            etcd_range(&KeyRange::Prefix(String::new())),
            (b"\0".to_vec(), Some(b"\0".to_vec()))
        );
        assert_eq!(
            etcd_range(&KeyRange::Between {
                start: String::new(),
                end: "/b".into()
            }),
            (b"\0".to_vec(), Some(b"/b".to_vec()))
        );
        // A multi-byte last character: its last byte is incremented.
        assert_eq!(
            prefix_end("/é"),
            "/é".as_bytes()[..2]
                .iter()
                .copied()
                .chain([0xaa])
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn etcd_status_messages_map_to_store_errors() {
        let status = |code, message: &str| {
            classify(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, message,
            )))
        };
        use tonic::Code;
        assert!(matches!(
            status(
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            ),
            Failure::Compacted
        ));
        assert!(matches!(
            status(
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision"
            ),
            Failure::FutureRevision
        ));
        assert!(matches!(
            status(Code::NotFound, "etcdserver: requested lease not found"),
            Failure::LeaseNotFound
        ));
        assert!(matches!(
            status(Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
            Failure::Other(StoreError::InvalidArgument(m)) if m == "duplicate key given in txn request"
        ));
        assert!(matches!(
            status(Code::Unavailable, "etcdserver: no leader"),
            Failure::Other(StoreError::Unavailable(_))
        ));
    }
}
