#![allow(clippy::all, missing_docs)]
//! Code generated from `proto/warrant/v1` by build.rs.

tonic::include_proto!("warrant.v1");

/// The encoded descriptor set of `warrant.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/warrant_descriptor.bin"));
