//! A small OVSDB client (RFC 7047): JSON-RPC over the unix socket of an `ovsdb-server`.
//!
//! OVSDB sends JSON values back to back on the stream, with no newline or length between
//! them, so [`Decoder`] parses incrementally over a buffer and hands out whole values as
//! they complete. [`OvsdbClient`] owns one connection: a background task reads every
//! message, routes responses to their callers by request id and answers the server's
//! `echo` requests (the server closes connections that stop answering them). Updates and
//! other notifications are ignored: the switch driver observes by `select`, never by
//! monitor, so it has no cache to go stale.
//!
//! Only what the driver needs is here: `list_dbs`, `transact` with the operations of
//! RFC 7047 §5.2 ([`Op`]), and `echo`. A transaction whose per-operation results hold an
//! error fails as a whole ([`OvsdbError::OperationFailed`], or
//! [`OvsdbError::CommitFailed`] for the extra result the server adds when the commit
//! itself is refused, e.g. on a duplicate name).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

/// How long a request waits for its response by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an OVSDB call failed.
#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    /// The socket could not be reached.
    #[error("connect to OVSDB at {}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a request failed.
    #[error("write to OVSDB")]
    Write(#[source] std::io::Error),
    /// The connection is gone: the server closed it, or reading from it failed.
    #[error("OVSDB connection closed: {0}")]
    Closed(String),
    /// The server sent something that is not OVSDB JSON-RPC.
    #[error("malformed OVSDB message: {0}")]
    Protocol(String),
    /// The server answered the request with an error.
    #[error("OVSDB {method}: {error}")]
    Rpc {
        /// The method called.
        method: String,
        /// The error the server returned, as JSON.
        error: String,
    },
    /// One operation of a transaction failed; the transaction was not committed.
    #[error("OVSDB transaction: operation {index} ({op}) failed: {error}: {details}")]
    OperationFailed {
        /// The operation's index in the transaction.
        index: usize,
        /// The operation's name (`insert`, `mutate`, …).
        op: String,
        /// The error's short name (`constraint violation`, `timed out`, …).
        error: String,
        /// The server's explanation.
        details: String,
    },
    /// Every operation succeeded but the server refused to commit the result (a
    /// constraint such as a unique name, or referential integrity).
    #[error("OVSDB transaction not committed: {error}: {details}")]
    CommitFailed {
        /// The error's short name.
        error: String,
        /// The server's explanation.
        details: String,
    },
    /// No response came in time.
    #[error("OVSDB {method}: no answer within {waited:?}")]
    Timeout {
        /// The method called.
        method: String,
        /// How long we waited.
        waited: Duration,
    },
}

// ---------------------------------------------------------------------------------------
// The codec.

/// Splits a byte stream into JSON values, however the stream was cut into reads.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete value, `None` if the buffer holds only part of one (or nothing),
    /// or an error if the bytes cannot become JSON.
    pub fn next_value(&mut self) -> Result<Option<Value>, OvsdbError> {
        let mut values = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match values.next() {
            None => {
                // Only whitespace so far.
                self.buffer.clear();
                Ok(None)
            }
            Some(Ok(value)) => {
                let used = values.byte_offset();
                self.buffer.drain(..used);
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(OvsdbError::Protocol(e.to_string())),
        }
    }
}

/// One JSON-RPC message, as OVSDB uses them (JSON-RPC 1.0).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A request the peer expects an answer to (the server sends `echo`).
    Request {
        /// Its id, echoed in the response.
        id: Value,
        /// The method.
        method: String,
        /// Its parameters.
        params: Value,
    },
    /// A request with a null id: no answer is expected (`update`, `locked`, …).
    Notification {
        /// The method.
        method: String,
        /// Its parameters.
        params: Value,
    },
    /// The answer to one of our requests: exactly one of `result` and `error` is set.
    Response {
        /// The id of the request it answers.
        id: Value,
        /// The result (null on error).
        result: Value,
        /// The error (null on success).
        error: Value,
    },
}

impl Message {
    /// Reads a message from a decoded JSON value.
    pub fn from_value(value: Value) -> Result<Message, OvsdbError> {
        let Value::Object(mut object) = value else {
            return Err(OvsdbError::Protocol(format!("not an object: {value}")));
        };
        let id = object.remove("id").unwrap_or(Value::Null);
        match object.remove("method") {
            Some(Value::String(method)) => {
                let params = object.remove("params").unwrap_or(Value::Null);
                Ok(if id.is_null() {
                    Message::Notification { method, params }
                } else {
                    Message::Request { id, method, params }
                })
            }
            Some(other) => Err(OvsdbError::Protocol(format!(
                "method is not a string: {other}"
            ))),
            None if !id.is_null() => Ok(Message::Response {
                id,
                result: object.remove("result").unwrap_or(Value::Null),
                error: object.remove("error").unwrap_or(Value::Null),
            }),
            None => Err(OvsdbError::Protocol(
                "neither a request nor a response".to_owned(),
            )),
        }
    }

    /// The message as it goes on the wire.
    pub fn to_value(&self) -> Value {
        match self {
            Message::Request { id, method, params } => {
                json!({"id": id, "method": method, "params": params})
            }
            Message::Notification { method, params } => {
                json!({"id": null, "method": method, "params": params})
            }
            Message::Response { id, result, error } => {
                json!({"id": id, "result": result, "error": error})
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Transactions.

/// A condition of a `where` clause: `[column, function, value]`, e.g.
/// `Condition::eq("name", "br-int")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The column.
    pub column: String,
    /// `==`, `!=`, `includes`, `excludes`, `<`, ….
    pub function: &'static str,
    /// The value, in OVSDB's notation.
    pub value: Value,
}

impl Condition {
    /// `column == value`.
    pub fn eq(column: &str, value: impl Into<Value>) -> Condition {
        Condition {
            column: column.to_owned(),
            function: "==",
            value: value.into(),
        }
    }

    /// `column includes value` (a set column holding the value).
    pub fn includes(column: &str, value: impl Into<Value>) -> Condition {
        Condition {
            column: column.to_owned(),
            function: "includes",
            value: value.into(),
        }
    }

    fn to_value(&self) -> Value {
        json!([self.column, self.function, self.value])
    }
}

/// A mutation of a `mutate` operation: `[column, mutator, value]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// The column.
    pub column: String,
    /// `insert`, `delete`, `+=`, ….
    pub mutator: &'static str,
    /// The value, in OVSDB's notation.
    pub value: Value,
}

impl Mutation {
    /// Adds the elements of `value` (a set or map) to the column.
    pub fn insert(column: &str, value: impl Into<Value>) -> Mutation {
        Mutation {
            column: column.to_owned(),
            mutator: "insert",
            value: value.into(),
        }
    }

    /// Removes the elements of `value` from the column.
    pub fn delete(column: &str, value: impl Into<Value>) -> Mutation {
        Mutation {
            column: column.to_owned(),
            mutator: "delete",
            value: value.into(),
        }
    }

    /// Adds a number to an integer column.
    pub fn add(column: &str, amount: i64) -> Mutation {
        Mutation {
            column: column.to_owned(),
            mutator: "+=",
            value: amount.into(),
        }
    }

    fn to_value(&self) -> Value {
        json!([self.column, self.mutator, self.value])
    }
}

/// One operation of a transaction (RFC 7047 §5.2).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Inserts a row; `uuid_name` lets later operations of the same transaction refer to
    /// it as `["named-uuid", name]`.
    Insert {
        /// The table.
        table: String,
        /// The columns to set.
        row: Map<String, Value>,
        /// The row's name within the transaction.
        uuid_name: Option<String>,
    },
    /// Reads the rows that match.
    Select {
        /// The table.
        table: String,
        /// The conditions, all of which must hold.
        conditions: Vec<Condition>,
        /// The columns to return; `None` for all.
        columns: Option<Vec<String>>,
    },
    /// Sets columns of the rows that match.
    Update {
        /// The table.
        table: String,
        /// The conditions.
        conditions: Vec<Condition>,
        /// The columns to set.
        row: Map<String, Value>,
    },
    /// Changes columns of the rows that match in place.
    Mutate {
        /// The table.
        table: String,
        /// The conditions.
        conditions: Vec<Condition>,
        /// The changes.
        mutations: Vec<Mutation>,
    },
    /// Deletes the rows that match.
    Delete {
        /// The table.
        table: String,
        /// The conditions.
        conditions: Vec<Condition>,
    },
    /// Makes the transaction wait until (`==`) or while (`!=`) the matching rows' columns
    /// equal `rows`, failing with `timed out` after `timeout_ms`.
    Wait {
        /// The table.
        table: String,
        /// The conditions.
        conditions: Vec<Condition>,
        /// The columns compared.
        columns: Vec<String>,
        /// `==` or `!=`.
        until: &'static str,
        /// The rows to compare with.
        rows: Vec<Map<String, Value>>,
        /// How long to wait, in milliseconds; `None` for ever.
        timeout_ms: Option<u64>,
    },
    /// Writes a comment into the database log, for operators reading it.
    Comment(String),
}

impl Op {
    /// The operation's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Insert { .. } => "insert",
            Op::Select { .. } => "select",
            Op::Update { .. } => "update",
            Op::Mutate { .. } => "mutate",
            Op::Delete { .. } => "delete",
            Op::Wait { .. } => "wait",
            Op::Comment(_) => "comment",
        }
    }

    /// The operation as it goes on the wire.
    pub fn to_value(&self) -> Value {
        let conditions =
            |conditions: &[Condition]| Value::from_iter(conditions.iter().map(Condition::to_value));
        let mut op = match self {
            Op::Insert {
                table,
                row,
                uuid_name,
            } => {
                let mut op = json!({"table": table, "row": row});
                if let Some(name) = uuid_name {
                    op["uuid-name"] = name.clone().into();
                }
                op
            }
            Op::Select {
                table,
                conditions: where_,
                columns,
            } => {
                let mut op = json!({"table": table, "where": conditions(where_)});
                if let Some(columns) = columns {
                    op["columns"] = json!(columns);
                }
                op
            }
            Op::Update {
                table,
                conditions: where_,
                row,
            } => json!({"table": table, "where": conditions(where_), "row": row}),
            Op::Mutate {
                table,
                conditions: where_,
                mutations,
            } => json!({
                "table": table,
                "where": conditions(where_),
                "mutations": Value::from_iter(mutations.iter().map(Mutation::to_value)),
            }),
            Op::Delete {
                table,
                conditions: where_,
            } => json!({"table": table, "where": conditions(where_)}),
            Op::Wait {
                table,
                conditions: where_,
                columns,
                until,
                rows,
                timeout_ms,
            } => {
                let mut op = json!({
                    "table": table,
                    "where": conditions(where_),
                    "columns": columns,
                    "until": until,
                    "rows": rows,
                });
                if let Some(timeout) = timeout_ms {
                    op["timeout"] = (*timeout).into();
                }
                op
            }
            Op::Comment(comment) => json!({"comment": comment}),
        };
        op["op"] = self.name().into();
        op
    }
}

/// What one operation of a committed transaction returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpResult {
    /// The uuid of the row an `insert` made.
    pub uuid: Option<String>,
    /// The rows a `select` read.
    pub rows: Vec<Map<String, Value>>,
    /// How many rows an `update`, `mutate` or `delete` touched.
    pub count: Option<u64>,
}

/// Reads the result of `transact`, failing on the first error it holds.
pub fn transact_results(ops: &[Op], result: Value) -> Result<Vec<OpResult>, OvsdbError> {
    let Value::Array(results) = result else {
        return Err(OvsdbError::Protocol(format!(
            "transact result is not an array: {result}"
        )));
    };
    // An error can only be followed by nulls, so look for it before reading anything.
    for (index, result) in results.iter().enumerate() {
        if let Some(error) = result.get("error") {
            let error = error.as_str().unwrap_or_default().to_owned();
            let details = result
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            return Err(match ops.get(index) {
                Some(op) => OvsdbError::OperationFailed {
                    index,
                    op: op.name().to_owned(),
                    error,
                    details,
                },
                None => OvsdbError::CommitFailed { error, details },
            });
        }
    }
    if results.len() < ops.len() {
        return Err(OvsdbError::Protocol(format!(
            "{} results for {} operations",
            results.len(),
            ops.len()
        )));
    }
    results
        .into_iter()
        .take(ops.len())
        .map(|result| {
            let mut out = OpResult::default();
            if let Some(uuid) = result.get("uuid") {
                out.uuid = datum_uuid(uuid).map(str::to_owned);
            }
            if let Some(rows) = result.get("rows").and_then(Value::as_array) {
                out.rows = rows
                    .iter()
                    .filter_map(|row| row.as_object().cloned())
                    .collect();
            }
            out.count = result.get("count").and_then(Value::as_u64);
            Ok(out)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// OVSDB's notation for values (RFC 7047 §5.1).

/// `["uuid", id]`: a reference to a row.
pub fn uuid(id: &str) -> Value {
    json!(["uuid", id])
}

/// `["named-uuid", name]`: a reference to a row inserted earlier in the same transaction.
pub fn named_uuid(name: &str) -> Value {
    json!(["named-uuid", name])
}

/// `["set", [...]]`.
pub fn set(items: impl IntoIterator<Item = Value>) -> Value {
    json!(["set", Value::from_iter(items)])
}

/// The empty set, which is how OVSDB writes "no value" for an optional column.
pub fn empty_set() -> Value {
    set([])
}

/// `["map", [[k, v], ...]]` of strings.
pub fn string_map(map: &BTreeMap<String, String>) -> Value {
    json!([
        "map",
        Value::from_iter(map.iter().map(|(k, v)| json!([k, v])))
    ])
}

/// The id in `["uuid", id]`, if the value is one.
pub fn datum_uuid(value: &Value) -> Option<&str> {
    match value.as_array()?.as_slice() {
        [tag, id] if tag == "uuid" => id.as_str(),
        _ => None,
    }
}

/// The elements of a set column: a lone atom is a set of one, `["set", [...]]` a set of
/// any size.
pub fn datum_set(value: &Value) -> Vec<&Value> {
    match value.as_array().map(Vec::as_slice) {
        Some([tag, items]) if tag == "set" => items
            .as_array()
            .map(|i| i.iter().collect())
            .unwrap_or_default(),
        _ => vec![value],
    }
}

/// The single element of an optional column (a set of at most one), if it has one.
pub fn datum_optional(value: &Value) -> Option<&Value> {
    datum_set(value).into_iter().next()
}

/// A map column of strings to strings; other values are skipped.
pub fn datum_string_map(value: &Value) -> BTreeMap<String, String> {
    let Some([tag, pairs]) = value.as_array().map(Vec::as_slice) else {
        return BTreeMap::new();
    };
    if tag != "map" {
        return BTreeMap::new();
    }
    pairs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| match pair.as_array()?.as_slice() {
            [k, v] => Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The client.

type Pending = HashMap<u64, oneshot::Sender<Result<Value, OvsdbError>>>;

/// State shared by the client and its reader task.
struct Shared {
    pending: Mutex<Pending>,
    /// Why the connection ended, once it has.
    closed: Mutex<Option<String>>,
}

impl Shared {
    fn close(&self, reason: String) {
        // Never hold both locks: `request` takes them in the other order.
        self.closed
            .lock()
            .expect("closed poisoned")
            .get_or_insert(reason.clone());
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending poisoned"));
        for (_, waiter) in pending {
            let _ = waiter.send(Err(OvsdbError::Closed(reason.clone())));
        }
    }
}

/// One connection to an `ovsdb-server`. Requests may be made concurrently; each waits
/// for its own response.
pub struct OvsdbClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
    broken: AtomicBool,
}

impl std::fmt::Debug for OvsdbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvsdbClient")
            .field("closed", &self.closed_reason())
            .finish_non_exhaustive()
    }
}

impl Drop for OvsdbClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl OvsdbClient {
    /// Connects to the server's unix socket (`punix:` remote).
    pub async fn connect(path: &Path) -> Result<OvsdbClient, OvsdbError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| OvsdbError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (mut read, write) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let reader = {
            let writer = writer.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let reason = read_messages(&mut read, &writer, &shared).await;
                shared.close(reason);
            })
        };
        Ok(OvsdbClient {
            writer,
            shared,
            next_id: AtomicU64::new(1),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            reader,
            broken: AtomicBool::new(false),
        })
    }

    /// Sets how long each request waits for its response.
    pub fn with_timeout(mut self, timeout: Duration) -> OvsdbClient {
        self.timeout = timeout;
        self
    }

    /// Why the connection ended, or `None` while it is usable.
    pub fn closed_reason(&self) -> Option<String> {
        if self.broken.load(Ordering::Relaxed) {
            return Some("a write failed".to_owned());
        }
        self.shared.closed.lock().expect("closed poisoned").clone()
    }

    /// Whether the connection can still carry requests.
    pub fn is_open(&self) -> bool {
        self.closed_reason().is_none()
    }

    /// Calls `method` and waits for its result.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, OvsdbError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        {
            // Checked under the pending lock, so a close cannot slip in between and leave
            // this request waiting for ever.
            let mut pending = self.shared.pending.lock().expect("pending poisoned");
            if let Some(reason) = self.closed_reason() {
                return Err(OvsdbError::Closed(reason));
            }
            pending.insert(id, answer);
        }
        let message = Message::Request {
            id: id.into(),
            method: method.to_owned(),
            params,
        };
        if let Err(e) = write_message(&self.writer, &message).await {
            self.shared
                .pending
                .lock()
                .expect("pending poisoned")
                .remove(&id);
            self.broken.store(true, Ordering::Relaxed);
            return Err(e);
        }
        let result = match tokio::time::timeout(self.timeout, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(OvsdbError::Closed("reader ended".to_owned())),
            Err(_) => {
                self.shared
                    .pending
                    .lock()
                    .expect("pending poisoned")
                    .remove(&id);
                Err(OvsdbError::Timeout {
                    method: method.to_owned(),
                    waited: self.timeout,
                })
            }
        };
        result.map_err(|e| match e {
            OvsdbError::Rpc { error, .. } => OvsdbError::Rpc {
                method: method.to_owned(),
                error,
            },
            other => other,
        })
    }

    /// The databases the server holds (`Open_vSwitch`, `_Server`).
    pub async fn list_dbs(&self) -> Result<Vec<String>, OvsdbError> {
        let result = self.request("list_dbs", json!([])).await?;
        serde_json::from_value(result.clone())
            .map_err(|_| OvsdbError::Protocol(format!("list_dbs result: {result}")))
    }

    /// Asks the server to echo `params` back: a liveness check.
    pub async fn echo(&self, params: Value) -> Result<Value, OvsdbError> {
        self.request("echo", params).await
    }

    /// Runs the operations as one atomic transaction on `database`. Fails if any
    /// operation or the commit fails, in which case nothing was changed.
    pub async fn transact(&self, database: &str, ops: &[Op]) -> Result<Vec<OpResult>, OvsdbError> {
        let mut params = vec![Value::from(database)];
        params.extend(ops.iter().map(Op::to_value));
        let result = self.request("transact", Value::Array(params)).await?;
        transact_results(ops, result)
    }
}

async fn write_message(
    writer: &tokio::sync::Mutex<OwnedWriteHalf>,
    message: &Message,
) -> Result<(), OvsdbError> {
    let bytes = serde_json::to_vec(&message.to_value()).expect("JSON values serialise");
    let mut writer = writer.lock().await;
    writer.write_all(&bytes).await.map_err(OvsdbError::Write)
}

/// Reads messages until the connection ends, and returns why it ended.
async fn read_messages(
    read: &mut tokio::net::unix::OwnedReadHalf,
    writer: &tokio::sync::Mutex<OwnedWriteHalf>,
    shared: &Shared,
) -> String {
    let mut decoder = Decoder::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            let message = match decoder.next_value() {
                Ok(None) => break,
                Ok(Some(value)) => Message::from_value(value),
                Err(e) => Err(e),
            };
            let message = match message {
                Ok(message) => message,
                Err(e) => return e.to_string(),
            };
            match message {
                Message::Request { id, method, params } if method == "echo" => {
                    let reply = Message::Response {
                        id,
                        result: params,
                        error: Value::Null,
                    };
                    if let Err(e) = write_message(writer, &reply).await {
                        return crate::images::error_chain(&e);
                    }
                }
                Message::Request { id, method, .. } => {
                    let reply = Message::Response {
                        id,
                        result: Value::Null,
                        error: format!("unknown method {method}").into(),
                    };
                    if let Err(e) = write_message(writer, &reply).await {
                        return crate::images::error_chain(&e);
                    }
                }
                Message::Notification { .. } => {}
                Message::Response { id, result, error } => {
                    let Some(id) = id.as_u64() else { continue };
                    let waiter = shared.pending.lock().expect("pending poisoned").remove(&id);
                    if let Some(waiter) = waiter {
                        let answer = if error.is_null() {
                            Ok(result)
                        } else {
                            Err(OvsdbError::Rpc {
                                method: String::new(),
                                error: error.to_string(),
                            })
                        };
                        let _ = waiter.send(answer);
                    }
                }
            }
        }
        match read.read(&mut chunk).await {
            Ok(0) => return "the server closed the connection".to_owned(),
            Ok(n) => decoder.extend(&chunk[..n]),
            Err(e) => return format!("read: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ovsdb-server` 3.1 sent, back to back, for `list_dbs`, a failing
    /// `transact` and an unknown method, then its own `echo` request.
    const RECORDED: &str = concat!(
        r#"{"id":0,"result":["Open_vSwitch","_Server"],"error":null}"#,
        r#"{"id":2,"result":[{"uuid":["uuid","23001a13-7534-428d-b32e-526a7899623a"]},{"syntax":"{\"op\":\"bogus\"}","details":"Parsing ovsdb operation 2 of 2 failed: No operation \"bogus\"","error":"syntax error"}],"error":null}"#,
        r#"{"id":4,"error":"unknown method"}"#,
        r#"{"id":"echo","method":"echo","params":[]}"#,
    );

    fn decode_all(chunks: &[&[u8]]) -> Vec<Value> {
        let mut decoder = Decoder::new();
        let mut values = Vec::new();
        for chunk in chunks {
            decoder.extend(chunk);
            while let Some(value) = decoder.next_value().unwrap() {
                values.push(value);
            }
        }
        values
    }

    #[test]
    fn splits_values_sent_back_to_back_however_the_reads_fall() {
        let bytes = RECORDED.as_bytes();
        let whole = decode_all(&[bytes]);
        assert_eq!(whole.len(), 4);
        for cut in 0..bytes.len() {
            assert_eq!(
                decode_all(&[&bytes[..cut], &bytes[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let byte_by_byte: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(decode_all(&byte_by_byte), whole);
    }

    #[test]
    fn skips_whitespace_between_values() {
        let values = decode_all(&[b"  {\"id\":1,\"result\":[],\"error\":null}\n\n", b" \n"]);
        assert_eq!(values.len(), 1);
    }

    #[test]
    fn rejects_what_is_not_json() {
        let mut decoder = Decoder::new();
        decoder.extend(b"{\"id\":1}} garbage");
        assert!(decoder.next_value().unwrap().is_some());
        assert!(matches!(decoder.next_value(), Err(OvsdbError::Protocol(_))));
    }

    #[test]
    fn tells_requests_notifications_and_responses_apart() {
        let messages: Vec<Message> = decode_all(&[RECORDED.as_bytes()])
            .into_iter()
            .map(|v| Message::from_value(v).unwrap())
            .collect();
        assert!(matches!(
            &messages[0],
            Message::Response { id, error, .. } if id == 0 && error.is_null()
        ));
        assert!(matches!(
            &messages[2],
            Message::Response { result, error, .. } if result.is_null() && error == "unknown method"
        ));
        assert_eq!(
            messages[3],
            Message::Request {
                id: "echo".into(),
                method: "echo".into(),
                params: json!([]),
            }
        );
        let update = json!({"id": null, "method": "update", "params": [null, {}]});
        assert!(matches!(
            Message::from_value(update).unwrap(),
            Message::Notification { method, .. } if method == "update"
        ));
        assert!(Message::from_value(json!([1, 2])).is_err());
    }

    #[test]
    fn an_error_among_the_results_fails_the_transaction() {
        let ops = [
            Op::Insert {
                table: "Bridge".into(),
                row: Map::new(),
                uuid_name: None,
            },
            Op::Comment("bogus".into()),
        ];
        let values = decode_all(&[RECORDED.as_bytes()]);
        let result = values[1]["result"].clone();
        match transact_results(&ops, result) {
            Err(OvsdbError::OperationFailed {
                index, op, error, ..
            }) => {
                assert_eq!(
                    (index, op.as_str(), error.as_str()),
                    (1, "comment", "syntax error")
                );
            }
            other => panic!("expected a failed operation, got {other:?}"),
        }
        // The extra result after the last operation is the commit's own error.
        let commit = json!([{"uuid": ["uuid", "u1"]}, {"count": 1}, {
            "error": "constraint violation",
            "details": "Transaction causes multiple rows in \"Bridge\" table to have identical values (\"br-int\") for index on column \"name\"."
        }]);
        assert!(matches!(
            transact_results(&ops, commit),
            Err(OvsdbError::CommitFailed { error, .. }) if error == "constraint violation"
        ));
    }

    #[test]
    fn reads_the_results_of_a_committed_transaction() {
        let ops = [
            Op::Insert {
                table: "Bridge".into(),
                row: Map::new(),
                uuid_name: Some("br".into()),
            },
            Op::Select {
                table: "Bridge".into(),
                conditions: vec![],
                columns: None,
            },
            Op::Mutate {
                table: "Open_vSwitch".into(),
                conditions: vec![],
                mutations: vec![],
            },
        ];
        let result = json!([
            {"uuid": ["uuid", "8d1551c9-6c02-476a-90ab-5e9db193b032"]},
            {"rows": [{"name": "br-int"}]},
            {"count": 1}
        ]);
        let results = transact_results(&ops, result).unwrap();
        assert_eq!(
            results[0].uuid.as_deref(),
            Some("8d1551c9-6c02-476a-90ab-5e9db193b032")
        );
        assert_eq!(results[1].rows[0]["name"], "br-int");
        assert_eq!(results[2].count, Some(1));
    }

    #[test]
    fn writes_operations_in_rfc_7047_notation() {
        let mut row = Map::new();
        row.insert("name".into(), "p1".into());
        let insert = Op::Insert {
            table: "Port".into(),
            row,
            uuid_name: Some("port".into()),
        };
        assert_eq!(
            insert.to_value(),
            json!({"op": "insert", "table": "Port", "row": {"name": "p1"}, "uuid-name": "port"})
        );
        let mutate = Op::Mutate {
            table: "Bridge".into(),
            conditions: vec![Condition::eq("name", "br-int")],
            mutations: vec![Mutation::insert("ports", set([named_uuid("port")]))],
        };
        assert_eq!(
            mutate.to_value(),
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-int"]],
                   "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]})
        );
        let wait = Op::Wait {
            table: "Open_vSwitch".into(),
            conditions: vec![],
            columns: vec!["cur_cfg".into()],
            until: "==",
            rows: vec![],
            timeout_ms: Some(100),
        };
        assert_eq!(wait.to_value()["timeout"], 100);
        assert_eq!(wait.to_value()["until"], "==");
    }

    /// A server that sends its own `echo` first and answers `list_dbs` in two writes cut
    /// mid-value, the way a stream may deliver it; then closes.
    #[tokio::test]
    async fn the_client_answers_echo_and_reads_answers_however_they_arrive() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(br#"{"id":"echo","method":"echo","params":["x"]}"#)
                .await
                .unwrap();
            // Read until both the echo reply and the client's request have come.
            let mut decoder = Decoder::new();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while seen.len() < 2 {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client hung up");
                decoder.extend(&buf[..n]);
                while let Some(value) = decoder.next_value().unwrap() {
                    seen.push(Message::from_value(value).unwrap());
                }
            }
            let request_id = seen
                .iter()
                .find_map(|m| match m {
                    Message::Request { id, method, .. } if method == "list_dbs" => Some(id.clone()),
                    _ => None,
                })
                .expect("a list_dbs request");
            let answer = format!(r#"{{"id":{request_id},"result":["Open_vSwitch"],"error":null}}"#);
            let (first, second) = answer.split_at(answer.len() / 2);
            stream.write_all(first.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.write_all(second.as_bytes()).await.unwrap();
            seen
        });
        // Without an answer to its echo the server never answers: the timeout fails the test.
        let client = OvsdbClient::connect(&path)
            .await
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        assert_eq!(client.list_dbs().await.unwrap(), ["Open_vSwitch"]);
        let seen = server.await.unwrap();
        assert!(seen.contains(&Message::Response {
            id: "echo".into(),
            result: json!(["x"]),
            error: Value::Null,
        }));
        // The server is gone: the next call fails at once rather than waiting.
        let closed = client.list_dbs().await;
        assert!(
            matches!(
                closed,
                Err(OvsdbError::Closed(_)) | Err(OvsdbError::Write(_))
            ),
            "{closed:?}"
        );
        assert!(!client.is_open());
    }

    #[test]
    fn reads_ovsdb_values() {
        let row = json!({
            "tag": ["set", []],
            "ofport": 3,
            "ports": ["set", [["uuid", "a"], ["uuid", "b"]]],
            "one_port": ["uuid", "c"],
            "external_ids": ["map", [["iface-id", "p-1"], ["attached-mac", "52:54:00:00:00:01"]]],
        });
        assert_eq!(datum_optional(&row["tag"]), None);
        assert_eq!(datum_optional(&row["ofport"]), Some(&json!(3)));
        let ports: Vec<_> = datum_set(&row["ports"])
            .into_iter()
            .filter_map(datum_uuid)
            .collect();
        assert_eq!(ports, ["a", "b"]);
        let one: Vec<_> = datum_set(&row["one_port"])
            .into_iter()
            .filter_map(datum_uuid)
            .collect();
        assert_eq!(one, ["c"]);
        let ids = datum_string_map(&row["external_ids"]);
        assert_eq!(ids["iface-id"], "p-1");
        assert_eq!(datum_string_map(&string_map(&ids)), ids);
    }
}
