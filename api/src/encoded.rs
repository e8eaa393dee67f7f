//! Watch events encoded once and shared by every watcher they go to.
//!
//! A watch cache with a thousand watchers on a kind would otherwise clone and encode each
//! event a thousand times. [`EncodedEvent`] carries the protobuf encoding of a
//! `WatchEvent`; cloning it is a reference count, and writing it to the wire is a copy.
//! [`ResourcesService`] serves `Watch` with it and every other method through the
//! generated server; clients see the same `WatchEvent` messages as before.

use std::{convert::Infallible, pin::Pin};

use futures::{Stream, StreamExt};
use prost::{
    Message,
    bytes::{Buf, BufMut, Bytes},
    encoding::{DecodeContext, WireType},
};
use tonic::{
    Request, Response, Status,
    codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http},
    server::{NamedService, ServerStreamingService},
};

use crate::{server::ApiServer, v1};

/// The protobuf encoding of one `WatchEvent`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedEvent(Bytes);

impl EncodedEvent {
    /// Encodes `event`.
    pub fn new(event: &v1::WatchEvent) -> Self {
        EncodedEvent(event.encode_to_vec().into())
    }

    /// The event, decoded again.
    pub fn decode(&self) -> Result<v1::WatchEvent, Status> {
        v1::WatchEvent::decode(self.0.clone())
            .map_err(|e| Status::internal(format!("a watch event does not decode: {e}")))
    }
}

/// Writes the bytes as they are: the message's encoding is what they hold. Ferro never
/// decodes into this type (clients decode `WatchEvent`); a decode keeps nothing.
impl Message for EncodedEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The stream of encoded events a Watch returns.
pub type EncodedStream = Pin<Box<dyn Stream<Item = Result<EncodedEvent, Status>> + Send>>;

/// The generated `WatchEvent` stream of an encoded one, for callers of the generated
/// service trait.
pub fn decoded(stream: EncodedStream) -> crate::server::WatchStream {
    Box::pin(stream.map(|item| item.and_then(|event| event.decode())))
}

/// The Resources gRPC service: `Watch` sends each event's shared encoding; every other
/// method goes to the generated server.
#[derive(Clone)]
pub struct ResourcesService {
    api: ApiServer,
    inner: v1::resources_server::ResourcesServer<ApiServer>,
}

impl ResourcesService {
    pub(crate) fn new(api: ApiServer) -> Self {
        let limits = api.limits();
        let inner = v1::resources_server::ResourcesServer::new(api.clone())
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes);
        ResourcesService { api, inner }
    }
}

impl NamedService for ResourcesService {
    const NAME: &'static str = v1::resources_server::SERVICE_NAME;
}

const WATCH_PATH: &str = "/ferro.v1.Resources/Watch";

impl<B> Service<http::Request<B>> for ResourcesService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.inner.call(request);
        }
        let api = self.api.clone();
        Box::pin(async move {
            let limits = api.limits();
            let codec = tonic_prost::ProstCodec::<EncodedEvent, v1::WatchRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(
                Some(limits.max_request_bytes),
                Some(limits.max_response_bytes),
            );
            Ok(grpc.server_streaming(EncodedWatch(api), request).await)
        })
    }
}

struct EncodedWatch(ApiServer);

impl ServerStreamingService<v1::WatchRequest> for EncodedWatch {
    type Response = EncodedEvent;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<Response<EncodedStream>, Status>;

    fn call(&mut self, request: Request<v1::WatchRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.watch_encoded(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_encoding_is_the_event_s_own() {
        let event = v1::WatchEvent {
            r#type: v1::watch_event::Type::Modified as i32,
            object: Some(v1::AnyObject::default()),
            resource_version: 42,
        };
        let encoded = EncodedEvent::new(&event);
        assert_eq!(encoded.encode_to_vec(), event.encode_to_vec());
        assert_eq!(encoded.encoded_len(), event.encoded_len());
        assert_eq!(encoded.decode().unwrap(), event);
    }
}
