//! Ferro's node agent: registers its Node, renews its heartbeat, and drives the host
//! towards what the API wants for everything placed on it.
//!
//! [`run`] is the whole agent (see [`agent`] for how its tasks fit together). The parts:
//! - [`node`]: registration, the heartbeat Lease and `Node.status`;
//! - [`server`]: the Server reconciler, with its pure planner in [`server::plan`]; it
//!   runs on the runtime the controllers share, [`ferro_runtime`] (a reflector of the
//!   Servers bound to this node, a work queue keyed by Server uid, resync, shutdown);
//! - [`images`]: the node's image cache;
//! - [`console`]: serial consoles, served to the apiserver's relay;
//! - [`hypervisor`] (QEMU) and [`configdrive`]: the external systems, behind traits;
//!   [`run`] takes its drivers as trait objects ([`Drivers`]).
//!
//! The agent never trusts its own memory: every reconcile observes the host, so guests
//! outlive the agent and a restarted agent adopts them.

pub mod agent;
pub mod configdrive;
pub mod console;
pub mod dhcp;
pub mod firewall;
pub mod hypervisor;
pub mod images;
pub mod links;
pub mod metadata;
pub mod network;
pub mod node;
pub mod router;
pub mod server;
pub mod storage;
pub mod switch;
pub mod volumes;
pub mod wiring;

pub use agent::{AgentConfig, DEFAULT_STATE_DIR, Drivers, read_token, run, stop_guests};
