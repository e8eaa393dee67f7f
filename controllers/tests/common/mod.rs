//! The in-process cloud integration tests run against: an apiserver over the in-memory
//! store on a loopback port, and controllers run as tasks that a test can abort (the
//! in-process equivalent of SIGKILL).
//!
//! The apiserver sits behind a gate that can hold IPAM's status writes forever, which is
//! how a test stops a controller between claiming addresses and recording them.

#![allow(dead_code)]

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ferro_api::{
    Kind, Object, Resource,
    auth::Tokens,
    client::{Client, Selection},
    codec,
    server::ApiServer,
    v1::{self, resources_server::Resources},
};
use ferro_controllers::{Options, api::Api, run_controllers};
use ferro_runtime::metrics::Metrics;
use ferro_store::memory::MemoryStore;
use tonic::{Request, Response, Status};

pub const TOKENS: &str = "admin-token admin\ncontrollers-token system:controllers\n";

/// The apiserver, with IPAM's status writes held while `hold_ipam_status` is set.
#[derive(Clone)]
struct Gate {
    inner: ApiServer,
    hold_ipam_status: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Resources for Gate {
    async fn apply(
        &self,
        r: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        self.inner.apply(r).await
    }
    async fn create(
        &self,
        r: Request<v1::CreateRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        self.inner.create(r).await
    }
    async fn get(
        &self,
        r: Request<v1::GetRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        self.inner.get(r).await
    }
    async fn list(
        &self,
        r: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        self.inner.list(r).await
    }
    type WatchStream = <ApiServer as Resources>::WatchStream;
    async fn watch(
        &self,
        r: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.inner.watch(r).await
    }
    async fn update(
        &self,
        r: Request<v1::UpdateRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        self.inner.update(r).await
    }
    async fn update_status(
        &self,
        r: Request<v1::UpdateStatusRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        if r.get_ref().writer == ferro_api::owners::IPAM
            && self.hold_ipam_status.load(Ordering::SeqCst)
        {
            // Never answered and never applied: the caller is "killed" before it lands.
            std::future::pending::<()>().await;
        }
        self.inner.update_status(r).await
    }
    async fn patch_metadata(
        &self,
        r: Request<v1::PatchMetadataRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        self.inner.patch_metadata(r).await
    }
    async fn bind(
        &self,
        r: Request<v1::BindRequest>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        self.inner.bind(r).await
    }
    async fn delete(
        &self,
        r: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        self.inner.delete(r).await
    }
}

pub struct Cloud {
    pub address: String,
    pub admin: Client,
    pub hold_ipam_status: Arc<AtomicBool>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Cloud {
    pub async fn start() -> Cloud {
        let store = Arc::new(MemoryStore::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let hold_ipam_status = Arc::new(AtomicBool::new(false));
        let gate = Gate {
            inner: ApiServer::new(store, Tokens::parse(TOKENS)),
            hold_ipam_status: hold_ipam_status.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(socket, _)| {
                let _ = socket.set_nodelay(true);
                socket
            });
            Some((accepted, listener))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(
                    v1::resources_server::ResourcesServer::new(gate)
                        .max_decoding_message_size(64 << 20),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
                .expect("the apiserver serves");
        });
        let admin = Client::connect_lazy(&address, "admin-token").unwrap();
        Cloud {
            address,
            admin,
            hold_ipam_status,
            _shutdown: tx,
        }
    }

    pub fn api(&self) -> Api {
        Api::connect_lazy(&self.address, "controllers-token").unwrap()
    }

    /// Runs every controller (without leader election) until the handle is aborted.
    pub fn controllers(&self) -> tokio::task::JoinHandle<()> {
        let options = Options {
            resync: Duration::from_secs(20),
            // Short, so failover tests wait little; still waited out through a requeue.
            router_failover_grace: Duration::from_secs(1),
            ..Options::default()
        };
        tokio::spawn(run_controllers(self.api(), Metrics::new(), options))
    }

    pub async fn create(&self, yaml: &str) -> Object {
        let object = codec::decode_yaml(yaml)
            .expect("test YAML decodes")
            .remove(0);
        self.admin.create(object).await.expect("create")
    }

    /// A Network with one subnet and no DHCP, so that the only Ports on it are the
    /// test's own (a DHCP subnet gets the network's DHCP Port: see [`Cloud::dhcp_network`]).
    pub async fn network(&self, name: &str, cidr: &str) -> v1::Network {
        let object = self
            .create(&format!(
                "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: {name}}}\nspec:\n  subnets:\n  - {{name: a, cidr: {cidr}, dhcp: false}}\n"
            ))
            .await;
        v1::Network::from_object(object).unwrap()
    }

    /// A Network with one subnet that has DHCP.
    pub async fn dhcp_network(&self, name: &str, cidr: &str) -> v1::Network {
        let object = self
            .create(&format!(
                "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: {name}}}\nspec:\n  subnets:\n  - {{name: a, cidr: {cidr}}}\n"
            ))
            .await;
        v1::Network::from_object(object).unwrap()
    }

    pub async fn port(&self, name: &str, network: &str) -> v1::Port {
        let object = self
            .create(&format!("apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: {name}}}\nspec: {{network: {network}}}\n"))
            .await;
        v1::Port::from_object(object).unwrap()
    }

    pub async fn list<T: Resource>(&self) -> Vec<T> {
        let (items, _) = self
            .admin
            .list(T::KIND, &Selection::all())
            .await
            .expect("list");
        items.into_iter().filter_map(T::from_object).collect()
    }

    pub async fn delete(&self, kind: Kind, project: &str, name: &str) {
        self.admin
            .delete_key(kind, project, name)
            .await
            .expect("delete");
    }
}

/// Polls `check` until it gives a value, for at most a minute; panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn decided(port: &v1::Port) -> bool {
    port.status
        .as_ref()
        .is_some_and(|s| !s.mac.is_empty() && !s.network_uid.is_empty())
}

pub fn ready(port: &v1::Port) -> Option<&v1::Condition> {
    port.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
}

pub fn uid<T: Resource>(object: &T) -> String {
    object.metadata().map(|m| m.uid.clone()).unwrap_or_default()
}

pub fn name<T: Resource>(object: &T) -> String {
    object
        .metadata()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

pub fn owner_uid<T: Resource>(object: &T) -> String {
    object
        .metadata()
        .and_then(|m| m.owner_references.first())
        .map(|r| r.uid.clone())
        .unwrap_or_default()
}
