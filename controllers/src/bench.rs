//! `ferro bench ipam`.
