//! Who is calling, and what they may do.
//!
//! Identity comes from a bearer token looked up in a token file (`TOKEN USER` per line,
//! written by `ferro up`). The [`Authorizer`] then decides each call:
//! - `admin` and `system:controllers` may do everything;
//! - `system:node:<name>` may read what a node needs, create its own Node and write its
//!   status, write the status fields the agent owns of objects bound to it and remove the
//!   agent's finalizer from them, write its heartbeat Lease `node-<name>`, and create Events
//!   — nothing else;
//! - anyone else is refused until users and role bindings are enforced.

use std::{collections::HashMap, path::Path};

use crate::{Error, Kind, owners};

/// The finalizer Bind puts on a Server so that its node's agent removes the guest and its
/// files before the object disappears.
pub const AGENT_FINALIZER: &str = "ferro.io/agent";

/// The `reportingComponent` of the Events a node's agent records: `agent/<node>`. A node
/// may bump (update) exactly the Events that name it, stored and written.
pub fn agent_component(node: &str) -> String {
    format!("agent/{node}")
}

/// The prefix of node identities.
pub const NODE_PREFIX: &str = "system:node:";

/// The identity of the controllers.
pub const CONTROLLERS: &str = "system:controllers";

/// The administrator's identity.
pub const ADMIN: &str = "admin";

/// Maps bearer tokens to identities.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// A table from `(token, identity)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Tokens(pairs.into_iter().collect())
    }

    /// Reads a token file: one `TOKEN IDENTITY` per line; `#` starts a comment.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self::parse(&text))
    }

    /// Parses a token file's text.
    pub fn parse(text: &str) -> Self {
        Tokens(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once(char::is_whitespace))
                .map(|(t, u)| (t.to_owned(), u.trim().to_owned()))
                .collect(),
        )
    }

    /// The identity of an `authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Identity, Error> {
        let header = header.ok_or_else(|| Error::Unauthenticated {
            message: "no token: pass `authorization: Bearer <token>` (ferro reads FERRO_TOKEN or its config)".into(),
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Error::Unauthenticated {
                message: "the authorization header must be `Bearer <token>`".into(),
            })?;
        self.0
            .get(token.trim())
            .map(|name| Identity { name: name.clone() })
            .ok_or_else(|| Error::Unauthenticated {
                message: "invalid token".into(),
            })
    }
}

/// The token a role presents, from a token file: either the file holds just the token, or
/// it is a token table (`TOKEN IDENTITY` per line, as `ferro up` writes) and the line of
/// `identity` is used. Errors say which file and which identity.
pub fn read_token_file(path: &Path, identity: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if let [only] = lines[..]
        && !only.contains(char::is_whitespace)
    {
        return Ok(only.to_owned());
    }
    lines
        .iter()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(_, who)| who.trim() == identity)
        .map(|(token, _)| token.to_owned())
        .ok_or_else(|| {
            format!(
                "the token file {} holds no token for {identity}",
                path.display()
            )
        })
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `admin`, `system:controllers`, `system:node:<name>`, ….
    pub name: String,
}

impl Identity {
    /// The node name of a node identity.
    pub fn node(&self) -> Option<&str> {
        self.name.strip_prefix(NODE_PREFIX)
    }
}

/// What a call does, as far as authorization cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// Get, List or Watch.
    Read,
    /// Create or Apply of a new object.
    Create,
    /// Apply or Update of an existing object's spec and metadata.
    Update,
    /// UpdateStatus by a writer.
    UpdateStatus,
    /// PatchMetadata.
    PatchMetadata,
    /// Bind.
    Bind,
    /// Delete.
    Delete,
}

/// The facts about a call the authorizer decides on.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The verb.
    pub verb: Verb,
    /// The kind.
    pub kind: Kind,
    /// The object's name; empty for List and Watch.
    pub name: &'a str,
    /// The node the stored object is bound to (`status.node`), when it has one.
    pub bound_node: Option<&'a str>,
    /// For UpdateStatus: the writer.
    pub writer: Option<&'a str>,
    /// For UpdateStatus: the node the object is bound to after the write.
    pub next_node: Option<&'a str>,
    /// For PatchMetadata: whether it changes only finalizers, and which.
    pub finalizers_only: Option<&'a [String]>,
    /// For an Update of an Event: the `reportingComponent` that both the stored Event and
    /// the update name (`None` when they differ).
    pub reporter: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A request with only verb, kind and name.
    pub fn new(verb: Verb, kind: Kind, name: &'a str) -> Self {
        Request {
            verb,
            kind,
            name,
            bound_node: None,
            writer: None,
            next_node: None,
            finalizers_only: None,
            reporter: None,
        }
    }
}

/// Decides whether an identity may make a call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Authorizer;

impl Authorizer {
    /// Allows or refuses, naming who tried what.
    pub fn authorize(&self, who: &Identity, request: &Request<'_>) -> Result<(), Error> {
        if who.name == ADMIN || who.name == CONTROLLERS {
            return Ok(());
        }
        if let Some(node) = who.node()
            && node_may(node, request)
        {
            return Ok(());
        }
        let what = if request.name.is_empty() {
            request.kind.plural().to_owned()
        } else {
            format!("{}/{}", request.kind.plural(), request.name)
        };
        Err(Error::PermissionDenied {
            message: format!("{} may not {} {what}", who.name, verb_text(request.verb)),
        })
    }
}

fn verb_text(verb: Verb) -> &'static str {
    match verb {
        Verb::Read => "read",
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::UpdateStatus => "write the status of",
        Verb::PatchMetadata => "change the metadata of",
        Verb::Bind => "bind",
        Verb::Delete => "delete",
    }
}

fn node_may(node: &str, r: &Request<'_>) -> bool {
    let bound_here = r.bound_node == Some(node);
    match (r.verb, r.kind) {
        // Identity and quota are none of a node's business.
        (Verb::Read, Kind::User | Kind::RoleBinding | Kind::Quota) => false,
        (Verb::Read, _) => true,
        (Verb::Create, Kind::Node) => r.name == node,
        (Verb::Create | Verb::Update, Kind::Lease) => r.name == format!("node-{node}"),
        (Verb::Create, Kind::Event) => true,
        // Bumping the count of its own Events; never another component's.
        (Verb::Update, Kind::Event) => r.reporter == Some(agent_component(node).as_str()),
        (Verb::UpdateStatus, Kind::Node) => r.name == node && r.writer == Some(owners::AGENT),
        // A Port is bound by the agent that plugs it: it may claim an unbound Port for
        // itself, and write or release its own, never bind one to another node.
        (Verb::UpdateStatus, Kind::Port) => {
            let unbound = r.bound_node.is_none_or(str::is_empty);
            let stays_here_or_goes = r.next_node.is_none_or(|n| n.is_empty() || n == node);
            (bound_here || unbound) && stays_here_or_goes && r.writer == Some(owners::AGENT)
        }
        (Verb::UpdateStatus, Kind::Server | Kind::Router | Kind::Volume) => {
            bound_here && r.writer == Some(owners::AGENT)
        }
        // A FloatingIP is translated by its Router's node, which the request does not
        // show; the owner table limits the agent to `Plumbed`, and the floating IP
        // controller believes one only when it names the router's current node.
        (Verb::UpdateStatus, Kind::FloatingIP) => r.writer == Some(owners::AGENT),
        (Verb::PatchMetadata, Kind::Server | Kind::Port | Kind::Router | Kind::Volume) => {
            bound_here
                && r.finalizers_only
                    .is_some_and(|f| f.iter().all(|f| f == AGENT_FINALIZER))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Identity {
        Identity {
            name: format!("{NODE_PREFIX}{name}"),
        }
    }

    #[test]
    fn tokens_authenticate() {
        let tokens = Tokens::parse("# comment\nabc admin\ndef system:node:n1\n");
        assert_eq!(
            tokens.authenticate(Some("Bearer abc")).unwrap().name,
            "admin"
        );
        assert_eq!(
            tokens.authenticate(Some("Bearer def")).unwrap().node(),
            Some("n1")
        );
        assert!(matches!(
            tokens.authenticate(Some("Bearer nope")),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(matches!(
            tokens.authenticate(None),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(matches!(
            tokens.authenticate(Some("abc")),
            Err(Error::Unauthenticated { .. })
        ));
    }

    #[test]
    fn a_node_may_do_exactly_its_part() {
        let a = Authorizer;
        let n1 = node("n1");
        let finalizer = vec![AGENT_FINALIZER.to_owned()];
        let other = vec!["ferro.io/ports".to_owned()];
        let status = |kind, name, bound, writer| Request {
            verb: Verb::UpdateStatus,
            kind,
            name,
            bound_node: bound,
            writer,
            next_node: None,
            finalizers_only: None,
            reporter: None,
        };
        let port = |bound, next| Request {
            bound_node: bound,
            next_node: next,
            ..status(Kind::Port, "p", None, Some(owners::AGENT))
        };
        let allowed = [
            Request::new(Verb::Read, Kind::Server, ""),
            Request::new(Verb::Create, Kind::Node, "n1"),
            Request::new(Verb::Create, Kind::Lease, "node-n1"),
            Request::new(Verb::Update, Kind::Lease, "node-n1"),
            Request::new(Verb::Create, Kind::Event, "x"),
            status(Kind::Node, "n1", None, Some(owners::AGENT)),
            status(Kind::Server, "s", Some("n1"), Some(owners::AGENT)),
            // The agent of a floating IP's router reports it plumbed.
            status(Kind::FloatingIP, "fip", None, Some(owners::AGENT)),
            // Claiming an unbound Port, keeping it, and releasing it.
            port(None, Some("n1")),
            port(Some(""), Some("n1")),
            port(Some("n1"), Some("n1")),
            port(Some("n1"), Some("")),
            Request {
                verb: Verb::PatchMetadata,
                kind: Kind::Server,
                name: "s",
                bound_node: Some("n1"),
                writer: None,
                next_node: None,
                finalizers_only: Some(&finalizer),
                reporter: None,
            },
            Request {
                reporter: Some("agent/n1"),
                ..Request::new(Verb::Update, Kind::Event, "web-1-0a1b")
            },
        ];
        for r in &allowed {
            assert!(a.authorize(&n1, r).is_ok(), "{r:?}");
        }
        let refused = [
            Request::new(Verb::Read, Kind::User, ""),
            Request::new(Verb::Create, Kind::Node, "n2"),
            Request::new(Verb::Update, Kind::Node, "n1"),
            Request::new(Verb::Create, Kind::Lease, "controllers"),
            Request::new(Verb::Create, Kind::Server, "s"),
            Request::new(Verb::Delete, Kind::Server, "s"),
            Request::new(Verb::Bind, Kind::Server, "s"),
            status(Kind::Node, "n2", None, Some(owners::AGENT)),
            status(Kind::Server, "s", Some("n2"), Some(owners::AGENT)),
            status(
                Kind::Server,
                "s",
                Some("n1"),
                Some(owners::SERVER_CONTROLLER),
            ),
            status(Kind::Network, "net", None, Some(owners::AGENT)),
            status(
                Kind::FloatingIP,
                "fip",
                None,
                Some(owners::FLOATING_IP_CONTROLLER),
            ),
            // Another node's Port, or binding one to another node.
            port(Some("n2"), Some("n1")),
            port(None, Some("n2")),
            port(Some("n1"), Some("n2")),
            Request {
                verb: Verb::PatchMetadata,
                kind: Kind::Server,
                name: "s",
                bound_node: Some("n1"),
                writer: None,
                next_node: None,
                finalizers_only: Some(&other),
                reporter: None,
            },
            // Another node's Event, a controller's, or one whose reporter would change.
            Request {
                reporter: Some("agent/n2"),
                ..Request::new(Verb::Update, Kind::Event, "web-1-0a1b")
            },
            Request {
                reporter: Some("scheduler"),
                ..Request::new(Verb::Update, Kind::Event, "web-1-0a1b")
            },
            Request::new(Verb::Update, Kind::Event, "web-1-0a1b"),
        ];
        for r in &refused {
            let err = a.authorize(&n1, r).unwrap_err();
            assert!(
                err.to_string().starts_with("system:node:n1 may not "),
                "{err}"
            );
        }
    }

    #[test]
    fn strangers_are_refused_and_admins_are_not() {
        let r = Request::new(Verb::Delete, Kind::Server, "web");
        assert!(
            Authorizer
                .authorize(&Identity { name: ADMIN.into() }, &r)
                .is_ok()
        );
        assert!(
            Authorizer
                .authorize(
                    &Identity {
                        name: CONTROLLERS.into()
                    },
                    &r
                )
                .is_ok()
        );
        let err = Authorizer
            .authorize(
                &Identity {
                    name: "mallory".into(),
                },
                &r,
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "mallory may not delete servers/web");
    }
}
