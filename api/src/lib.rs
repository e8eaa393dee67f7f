//! Ferro's API: the resource schema and everything that gives it meaning.
//!
//! - [`v1`]: the types generated from `proto/ferro/v1/*.proto`, the source of truth.
//! - [`codec`]: the YAML / JSON form users read and write (camelCase, plain integers,
//!   enum values spelled as in the schema, strict decoding that names the path of a bad
//!   field).
//! - [`kinds`]: the table of kinds — names, scope, store keys, status writers.
//! - [`validation`]: defaulting and validation, for create and for update.
//! - [`error`]: the one error type and its mapping to gRPC statuses.
//! - [`imagestore`] and [`images`]: the bytes of uploaded Images and the gRPC service
//!   that uploads and downloads them.
//! - [`resolve`]: how a reference by name resolves, for every component that follows one.
//! - [`quota`]: what objects count against a project's Quota, and its atomic admission.

pub mod auth;
pub mod cache;
pub mod client;
pub mod codec;
pub mod console;
pub mod encoded;
pub mod error;
pub mod images;
pub mod imagestore;
pub mod kinds;
pub mod owners;
pub mod quota;
pub mod resolve;
pub mod retry;
pub mod selector;
pub mod server;
pub mod validation;

pub use error::Error;
pub use kinds::{Kind, Object, Resource};

/// The `ferro/v1` types, generated from the schema.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/ferro.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the schema, with source comments.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferro_descriptor.bin"));

/// The schema's descriptors, decoded once.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(DESCRIPTOR_SET)
            .expect("the descriptor set compiled by build.rs decodes")
    })
}
