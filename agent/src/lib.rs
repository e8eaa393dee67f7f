//! Ferro's node agent: registers its Node, renews its heartbeat, and drives the host
//! towards what the API wants for everything placed on it.
//!
//! [`run`] is the whole agent (see [`agent`] for how its tasks fit together). The parts:
//! - [`node`]: registration, the heartbeat Lease and `Node.status`;
//! - [`reflector`] and [`queue`]: the Servers bound to this node, and the per-uid work
//!   queue their reconciles run from;
//! - [`server`]: the Server reconciler, with its pure planner in [`server::plan`];
//! - [`images`]: the node's image cache;
//! - [`console`]: serial consoles, served to the apiserver's relay;
//! - [`hypervisor`] (QEMU) and [`configdrive`]: the external systems, behind traits.
//!
//! The agent never trusts its own memory: every reconcile observes the host, so guests
//! outlive the agent and a restarted agent adopts them.

pub mod agent;
pub mod configdrive;
pub mod console;
pub mod hypervisor;
pub mod images;
pub mod node;
pub mod queue;
pub mod reflector;
pub mod server;
pub mod switch;

pub use agent::{AgentConfig, DEFAULT_STATE_DIR, read_token, run, stop_guests};
