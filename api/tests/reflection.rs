//! gRPC reflection as generic clients use it: both protocol versions (grpcurl and
//! grpc-java speak v1, grpcio's reflection client and older tools v1alpha) list every
//! service the apiserver serves, the health service included, and describe them.

use std::sync::Arc;

use ferro_api::{auth::Tokens, server::ApiServer};
use ferro_store::{Store, memory::MemoryStore};
use tonic_reflection::pb::{v1, v1alpha};

const SERVICES: [&str; 6] = [
    "ferro.v1.Consoles",
    "ferro.v1.Images",
    "ferro.v1.Resources",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

async fn start() -> (String, tokio::sync::oneshot::Sender<()>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = ApiServer::new(store, Tokens::parse("t admin\n"));
    tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    (address, tx)
}

#[tokio::test]
async fn both_reflection_versions_list_every_service_and_describe_them() {
    let (address, _stop) = start().await;

    let channel = tonic::transport::Endpoint::from_shared(address)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let asks = [
        v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".into(),
        ),
        v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "ferro.v1.WatchRequest".into(),
        ),
    ];
    let requests = asks.map(|ask| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ask),
    });
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    use v1alpha::server_reflection_response::MessageResponse as Alpha;
    match answers.message().await.unwrap().unwrap().message_response {
        Some(Alpha::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            assert_eq!(names, SERVICES);
        }
        other => panic!("v1alpha ListServices answered {other:?}"),
    }
    for _ in 0..2 {
        match answers.message().await.unwrap().unwrap().message_response {
            Some(Alpha::FileDescriptorResponse(files)) => {
                assert!(!files.file_descriptor_proto.is_empty())
            }
            other => panic!("v1alpha FileContainingSymbol answered {other:?}"),
        }
    }

    let mut v1 = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match answers.message().await.unwrap().unwrap().message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            assert_eq!(names, SERVICES);
        }
        other => panic!("v1 ListServices answered {other:?}"),
    }
}
