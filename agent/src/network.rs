//! The node's network reconciler: tenant networks, their ports and DHCP on this node.

pub mod plan;
