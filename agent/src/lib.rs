//! Ferro node agent: registers its Node and drives the host towards what the API wants.
//!
//! Each external system the agent drives sits behind a trait with its real driver beside
//! it; so far the [`hypervisor`] (QEMU) and the [`configdrive`] it hands to guests.

pub mod configdrive;
pub mod hypervisor;
