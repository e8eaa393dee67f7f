//! The one error type of the API, and its only mapping to and from gRPC statuses.
//!
//! The server turns an [`Error`] into a `tonic::Status` whose details carry an
//! [`v1::ErrorDetail`]; the client turns the status back into the same [`Error`], so the
//! CLI can print `servers/web-1: spec.flavor: flavor m1.huge not found` whatever side
//! found the problem.

use prost::Message;
use tonic::{Code, Status};

use crate::v1;

/// One refused field: its path and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field's path: `spec.networks[0].fixedIp`.
    pub path: String,
    /// Why it was refused.
    pub reason: String,
}

/// Every way an API call can fail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The object does not exist.
    #[error("{object} not found")]
    NotFound {
        /// `servers/web-1`.
        object: String,
    },
    /// An object with that name exists.
    #[error("{object} already exists")]
    AlreadyExists {
        /// `servers/web-1`.
        object: String,
    },
    /// The request or object is invalid; nothing was written.
    #[error("{}", render_invalid(object, violations))]
    InvalidArgument {
        /// `servers/web-1`, or empty when the request itself is wrong.
        object: String,
        /// Each refused field.
        violations: Vec<Violation>,
    },
    /// The object changed since it was read (stale resourceVersion or failed
    /// precondition on uid / revision); read it again and retry.
    #[error("{object}: {message}")]
    Conflict {
        /// `servers/web-1`.
        object: String,
        /// What differed.
        message: String,
    },
    /// The object is not in a state that allows the call (being deleted, already bound).
    #[error("{object}: {message}")]
    FailedPrecondition {
        /// `servers/web-1`.
        object: String,
        /// Why.
        message: String,
    },
    /// The requested revision is older than the server keeps; list again.
    #[error("{message}")]
    Expired {
        /// Which revision and what is kept.
        message: String,
    },
    /// The caller's identity may not do this.
    #[error("{message}")]
    PermissionDenied {
        /// Who tried what.
        message: String,
    },
    /// No valid token.
    #[error("{message}")]
    Unauthenticated {
        /// Why the token was refused.
        message: String,
    },
    /// A limit was reached (message size, quota).
    #[error("{message}")]
    ResourceExhausted {
        /// Which limit.
        message: String,
    },
    /// The server or its store cannot be reached now; retry.
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// A bug or a broken invariant.
    #[error("internal error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

fn render_invalid(object: &str, violations: &[Violation]) -> String {
    let fields: Vec<String> = violations
        .iter()
        .map(|v| {
            if v.path.is_empty() {
                v.reason.clone()
            } else {
                format!("{}: {}", v.path, v.reason)
            }
        })
        .collect();
    let fields = if fields.is_empty() {
        "invalid".to_owned()
    } else {
        fields.join("; ")
    };
    if object.is_empty() {
        fields
    } else {
        format!("{object}: {fields}")
    }
}

impl Error {
    /// An invalid field of an object (or of the request when `object` is empty).
    pub fn invalid(
        object: impl Into<String>,
        path: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            object: object.into(),
            violations: vec![Violation {
                path: path.into(),
                reason: reason.into(),
            }],
        }
    }

    /// An internal error.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Error::Internal {
            message: message.to_string(),
        }
    }

    /// The stable reason word carried on the wire.
    fn reason(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "NotFound",
            Error::AlreadyExists { .. } => "AlreadyExists",
            Error::InvalidArgument { .. } => "Invalid",
            Error::Conflict { .. } => "Conflict",
            Error::FailedPrecondition { .. } => "FailedPrecondition",
            Error::Expired { .. } => "Expired",
            Error::PermissionDenied { .. } => "PermissionDenied",
            Error::Unauthenticated { .. } => "Unauthenticated",
            Error::ResourceExhausted { .. } => "ResourceExhausted",
            Error::Unavailable { .. } => "Unavailable",
            Error::Internal { .. } => "Internal",
        }
    }

    fn object(&self) -> &str {
        match self {
            Error::NotFound { object }
            | Error::AlreadyExists { object }
            | Error::InvalidArgument { object, .. }
            | Error::Conflict { object, .. }
            | Error::FailedPrecondition { object, .. } => object,
            _ => "",
        }
    }

    fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Conflict { .. } => Code::Aborted,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::Expired { .. } => Code::OutOfRange,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Internal { .. } => Code::Internal,
        }
    }
}

impl From<crate::validation::Invalid> for Error {
    fn from(invalid: crate::validation::Invalid) -> Self {
        Error::InvalidArgument {
            object: invalid.object,
            violations: invalid
                .violations
                .into_iter()
                .map(|v| Violation {
                    path: v.path,
                    reason: v.reason,
                })
                .collect(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let detail = v1::ErrorDetail {
            object: error.object().to_owned(),
            violations: match &error {
                Error::InvalidArgument { violations, .. } => violations
                    .iter()
                    .map(|v| v1::FieldViolation {
                        path: v.path.clone(),
                        reason: v.reason.clone(),
                    })
                    .collect(),
                _ => Vec::new(),
            },
            reason: error.reason().to_owned(),
        };
        Status::with_details(
            error.code(),
            error.to_string(),
            detail.encode_to_vec().into(),
        )
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        let detail = v1::ErrorDetail::decode(status.details())
            .ok()
            .filter(|d| !d.reason.is_empty());
        let message = status.message().to_owned();
        let Some(detail) = detail else {
            // The connection broke under the call (the apiserver went away mid-call): tonic
            // reports that as `Unknown: transport error` or an HTTP/2 reset, which says
            // nothing to a user and is as transient as a refused connection.
            if let Some(reason) = transport_failure(&status) {
                return Error::Unavailable {
                    message: format!("the connection to the apiserver broke: {reason}"),
                };
            }
            // Not from a Ferro server (a proxy, the transport): keep the gRPC message.
            return match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    Error::Unavailable { message }
                }
                Code::Unauthenticated => Error::Unauthenticated { message },
                Code::PermissionDenied => Error::PermissionDenied { message },
                Code::ResourceExhausted => Error::ResourceExhausted { message },
                _ => Error::Internal {
                    message: format!("{:?}: {message}", status.code()),
                },
            };
        };
        let object = detail.object;
        // The message was rendered from the same fields; strip the object prefix the
        // Display impl adds back.
        let bare = message
            .strip_prefix(&format!("{object}: "))
            .unwrap_or(&message)
            .to_owned();
        match detail.reason.as_str() {
            "NotFound" => Error::NotFound { object },
            "AlreadyExists" => Error::AlreadyExists { object },
            "Invalid" => Error::InvalidArgument {
                object,
                violations: detail
                    .violations
                    .into_iter()
                    .map(|v| Violation {
                        path: v.path,
                        reason: v.reason,
                    })
                    .collect(),
            },
            "Conflict" => Error::Conflict {
                object,
                message: bare,
            },
            "FailedPrecondition" => Error::FailedPrecondition {
                object,
                message: bare,
            },
            "Expired" => Error::Expired { message },
            "PermissionDenied" => Error::PermissionDenied { message },
            "Unauthenticated" => Error::Unauthenticated { message },
            "ResourceExhausted" => Error::ResourceExhausted { message },
            "Unavailable" => Error::Unavailable { message },
            _ => Error::Internal {
                message: message
                    .strip_prefix("internal error: ")
                    .unwrap_or(&message)
                    .to_owned(),
            },
        }
    }
}

/// Whether a Ferro apiserver answered with this status (rather than the transport or a
/// proxy failing): its errors always carry an [`v1::ErrorDetail`].
pub(crate) fn answered_by_server(status: &Status) -> bool {
    v1::ErrorDetail::decode(status.details()).is_ok_and(|d| !d.reason.is_empty())
}

/// Why the connection failed, when `status` is the client's own report of a broken
/// connection rather than an answer: the innermost error of its cause chain.
fn transport_failure(status: &Status) -> Option<String> {
    let local = std::error::Error::source(status).is_some();
    let h2 = status.message().starts_with("h2 protocol error");
    let broken = matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Cancelled
    ) && (local || h2);
    if !broken {
        return None;
    }
    let mut innermost: &dyn std::error::Error = status;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    let reason = innermost.to_string();
    Some(
        if std::ptr::addr_eq(innermost, status as &dyn std::error::Error) {
            status.message().to_owned()
        } else {
            reason
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_survives_the_wire() {
        let errors = [
            Error::NotFound {
                object: "servers/web-1".into(),
            },
            Error::AlreadyExists {
                object: "ports/p".into(),
            },
            Error::InvalidArgument {
                object: "servers/web-1".into(),
                violations: vec![
                    Violation {
                        path: "spec.flavor".into(),
                        reason: "required".into(),
                    },
                    Violation {
                        path: "spec.image".into(),
                        reason: "bad".into(),
                    },
                ],
            },
            Error::Conflict {
                object: "servers/web-1".into(),
                message: "stale".into(),
            },
            Error::FailedPrecondition {
                object: "servers/a".into(),
                message: "being deleted".into(),
            },
            Error::Expired {
                message: "too old".into(),
            },
            Error::PermissionDenied {
                message: "no".into(),
            },
            Error::Unauthenticated {
                message: "no token".into(),
            },
            Error::ResourceExhausted {
                message: "too big".into(),
            },
            Error::Unavailable {
                message: "down".into(),
            },
            Error::Internal {
                message: "bug".into(),
            },
        ];
        for error in errors {
            let back = Error::from(Status::from(error.clone()));
            assert_eq!(back, error);
        }
    }

    #[test]
    fn a_broken_connection_is_unavailable_with_its_cause() {
        // What tonic reports when the apiserver goes away mid-call.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let status = Status::from_error(Box::new(io));
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(
            Error::from(status),
            Error::Unavailable {
                message: "the connection to the apiserver broke: connection reset".into()
            }
        );
        let reset = Status::internal("h2 protocol error: stream reset");
        assert!(matches!(Error::from(reset), Error::Unavailable { .. }));
        // An Unknown the server sent (no cause here) stays what it was.
        assert!(matches!(
            Error::from(Status::unknown("odd")),
            Error::Internal { .. }
        ));
        assert!(!answered_by_server(&Status::unavailable(
            "tcp connect error"
        )));
        assert!(answered_by_server(&Status::from(Error::Unavailable {
            message: "store unavailable".into()
        })));
    }

    #[test]
    fn invalid_renders_object_path_and_reason() {
        let e = Error::invalid("servers/web-1", "spec.flavor", "flavor m1.huge not found");
        assert_eq!(
            e.to_string(),
            "servers/web-1: spec.flavor: flavor m1.huge not found"
        );
    }
}
