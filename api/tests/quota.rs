//! Quota admission over real gRPC on loopback, each test run against the in-memory store
//! (with and without the watch cache) and against a real etcd (Debian's etcd-server,
//! started on free ports and removed afterwards).

use std::sync::Arc;

use ferro_api::{
    Error, Kind, Object,
    auth::Tokens,
    client::{ApplyOutcome, Client},
    codec,
    server::ApiServer,
    v1,
};
use ferro_store::{
    Store,
    etcd::EtcdStore,
    etcd_process::{EtcdOptions, EtcdProcess},
    memory::MemoryStore,
};
use tokio::sync::oneshot;

const TOKENS: &str = "admin-token admin\n";

struct Harness {
    admin: Client,
    _shutdown: oneshot::Sender<()>,
    _etcd: Option<EtcdProcess>,
}

impl Harness {
    async fn start(etcd: bool, cached: bool) -> Harness {
        let (store, process): (Arc<dyn Store>, _) = if etcd {
            let process = EtcdProcess::start(EtcdOptions::throwaway())
                .await
                .expect("etcd starts");
            let store = EtcdStore::connect(&[process.client_url().to_owned()])
                .await
                .expect("etcd connects");
            (Arc::new(store), Some(process))
        } else {
            (Arc::new(MemoryStore::new()), None)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let mut server = ApiServer::new(store, Tokens::parse(TOKENS));
        if !cached {
            server = server.without_cache();
        }
        tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("apiserver serves");
        });
        Harness {
            admin: Client::connect_lazy(&address, "admin-token").unwrap(),
            _shutdown: tx,
            _etcd: process,
        }
    }

    async fn create(&self, text: &str) -> Result<Object, Error> {
        self.admin.create(yaml(text)).await
    }

    /// The Quota `default` of `project` with these limits (a YAML flow mapping's inside).
    async fn quota(&self, project: &str, hard: &str) {
        self.create(&format!(
            "kind: Quota\nmetadata: {{name: default, project: {project}}}\nspec: {{hard: {{{hard}}}}}"
        ))
        .await
        .expect("the quota is created");
    }

    async fn flavor(&self, name: &str, vcpus: u32, ram_mib: u64) {
        self.create(&format!(
            "kind: Flavor\nmetadata: {{name: {name}}}\nspec: {{vcpus: {vcpus}, ramMib: {ram_mib}}}"
        ))
        .await
        .expect("the flavor is created");
    }

    async fn used(&self, project: &str) -> v1::QuotaAmounts {
        let Object::Quota(quota) = self
            .admin
            .get(Kind::Quota, project, "default")
            .await
            .unwrap()
        else {
            unreachable!("a Quota was asked for")
        };
        quota.status.and_then(|s| s.used).unwrap_or_default()
    }
}

fn yaml(text: &str) -> Object {
    let text = format!("apiVersion: ferro/v1\n{text}\n");
    codec::decode_yaml(&text)
        .expect("test YAML decodes")
        .remove(0)
}

fn server(project: &str, name: &str, flavor: &str) -> String {
    format!(
        "kind: Server\nmetadata: {{name: {name}, project: {project}}}\nspec: {{flavor: {flavor}, image: cirros}}"
    )
}

fn network(project: &str, name: &str) -> String {
    format!(
        "kind: Network\nmetadata: {{name: {name}, project: {project}}}\nspec: {{subnets: [{{name: a, cidr: 10.0.1.0/24}}]}}"
    )
}

fn exhausted(result: Result<Object, Error>) -> String {
    match result {
        Err(Error::ResourceExhausted { message }) => message,
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
}

macro_rules! all_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start(false, true).await).await;
                }
            )*
        }
        mod memory_without_cache {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start(false, false).await).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start(true, true).await).await;
                }
            )*
        }
    };
}

all_backends!(
    racing_creates_never_overshoot_a_limit,
    a_refusal_names_resource_limit_and_use,
    resizing_charges_the_difference,
    a_quota_created_over_existing_objects_counts_them,
    a_limit_below_use_blocks_only_growth,
    apply_and_dry_runs_are_charged_like_creates,
);

/// The check: 20 concurrent Server creates against a limit of 10 servers admit
/// exactly 10 and refuse 10 with ResourceExhausted, leaving the usage at 10; 20 rounds.
async fn racing_creates_never_overshoot_a_limit(h: Harness) {
    h.flavor("m1.small", 2, 1024).await;
    for round in 0..20 {
        let project = format!("race-{round}");
        h.quota(&project, "servers: 10").await;
        let creates = (0..20).map(|i| {
            let admin = h.admin.clone();
            let object = yaml(&server(&project, &format!("web-{i}"), "m1.small"));
            tokio::spawn(async move { admin.create(object).await })
        });
        let (mut admitted, mut refused) = (0, 0);
        for create in futures::future::join_all(creates).await {
            match create.expect("the create task runs") {
                Ok(_) => admitted += 1,
                Err(Error::ResourceExhausted { message }) => {
                    assert!(
                        message.starts_with(&format!(
                            "quota exceeded in project {project}: servers limit 10, used 10"
                        )),
                        "{message}"
                    );
                    refused += 1;
                }
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!((admitted, refused), (10, 10), "round {round}");
        let used = h.used(&project).await;
        assert_eq!(used.servers, Some(10), "round {round}");
        assert_eq!(used.vcpus, Some(20), "round {round}");
        assert_eq!(used.ram_mib, Some(10 * 1024), "round {round}");
        let (servers, _) = h
            .admin
            .list(
                Kind::Server,
                &ferro_api::client::Selection::project(&project),
            )
            .await
            .unwrap();
        assert_eq!(servers.len(), 10, "round {round}: what the store holds");
    }
}

async fn a_refusal_names_resource_limit_and_use(h: Harness) {
    h.flavor("m1.large", 4, 8192).await;
    h.quota("p", "servers: 5, vcpus: 6").await;
    h.create(&server("p", "a", "m1.large")).await.unwrap();
    let message = exhausted(h.create(&server("p", "b", "m1.large")).await);
    assert_eq!(
        message,
        "quota exceeded in project p: vcpus limit 6, used 4, requested 4"
    );
    // Nothing was written: not the Server, not the usage.
    assert!(matches!(
        h.admin.get(Kind::Server, "p", "b").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(h.used("p").await.vcpus, Some(4));
    // A Server whose Flavor does not exist cannot be counted while vCPUs are limited.
    let missing = h.create(&server("p", "c", "m1.gone")).await;
    assert!(
        matches!(&missing, Err(Error::FailedPrecondition { message, .. }) if message.contains("flavor m1.gone not found")),
        "{missing:?}"
    );
    // Another project has no Quota and no limit.
    for i in 0..8 {
        h.create(&server("free", &format!("s{i}"), "m1.large"))
            .await
            .unwrap();
    }
}

async fn resizing_charges_the_difference(h: Harness) {
    h.flavor("m1.small", 2, 1024).await;
    h.flavor("m1.medium", 4, 2048).await;
    h.flavor("m1.huge", 16, 2048).await;
    h.quota("p", "vcpus: 6, volumeGib: 30").await;
    h.create(&server("p", "a", "m1.small")).await.unwrap();
    let resize = |flavor: &str| yaml(&server("p", "a", flavor));
    let refused = h.admin.apply(resize("m1.huge"), "test", false).await;
    assert_eq!(
        exhausted(refused.map(|(o, _)| o)),
        "quota exceeded in project p: vcpus limit 6, used 2, requested 14"
    );
    let (_, outcome) = h
        .admin
        .apply(resize("m1.medium"), "test", false)
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Configured);
    assert_eq!(h.used("p").await.vcpus, Some(4));
    assert_eq!(h.used("p").await.ram_mib, Some(2048));
    // Update charges as Apply does.
    let current = h.admin.get(Kind::Server, "p", "a").await.unwrap();
    let Object::Server(mut grown) = current else {
        unreachable!()
    };
    grown.spec.as_mut().unwrap().flavor = "m1.huge".into();
    let refused = h.admin.update(Object::Server(grown)).await;
    assert!(
        exhausted(refused).contains("vcpus limit 6, used 4, requested 12"),
        "update is charged"
    );
    // A volume that grows is charged what it grows by.
    let volume = |gib: u32| {
        yaml(&format!(
            "kind: Volume\nmetadata: {{name: data, project: p}}\nspec: {{sizeGib: {gib}}}"
        ))
    };
    h.admin.apply(volume(10), "test", false).await.unwrap();
    h.admin.apply(volume(30), "test", false).await.unwrap();
    assert_eq!(h.used("p").await.volume_gib, Some(30));
    let refused = h.admin.apply(volume(31), "test", false).await;
    assert_eq!(
        exhausted(refused.map(|(o, _)| o)),
        "quota exceeded in project p: volumeGib limit 30, used 30, requested 1"
    );
}

async fn a_quota_created_over_existing_objects_counts_them(h: Harness) {
    for i in 0..3 {
        h.create(&network("p", &format!("n{i}"))).await.unwrap();
    }
    h.quota("p", "networks: 4").await;
    h.create(&network("p", "n3")).await.unwrap();
    let used = h.used("p").await;
    assert_eq!(
        used.networks,
        Some(4),
        "the first charge counted what existed"
    );
    assert_eq!(used.servers, Some(0), "usage covers every counted thing");
    let message = exhausted(h.create(&network("p", "n4")).await);
    assert_eq!(
        message,
        "quota exceeded in project p: networks limit 4, used 4, requested 1"
    );
}

async fn a_limit_below_use_blocks_only_growth(h: Harness) {
    h.quota("p", "networks: 5").await;
    for i in 0..3 {
        h.create(&network("p", &format!("n{i}"))).await.unwrap();
    }
    // Lowering the limit under the use is allowed.
    let (_, outcome) = h
        .admin
        .apply(
            yaml("kind: Quota\nmetadata: {name: default, project: p}\nspec: {hard: {networks: 1, ports: 10}}"),
            "test",
            false,
        )
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Configured);
    assert_eq!(h.used("p").await.networks, Some(3), "the usage is kept");
    exhausted(h.create(&network("p", "n3")).await);
    // Other things are still admitted.
    h.create("kind: Port\nmetadata: {name: p0, project: p}\nspec: {network: n0}")
        .await
        .unwrap();
    assert_eq!(h.used("p").await.ports, Some(1));
}

async fn apply_and_dry_runs_are_charged_like_creates(h: Harness) {
    h.quota("p", "routers: 1").await;
    let router = |name: &str| {
        yaml(&format!(
            "kind: Router\nmetadata: {{name: {name}, project: p}}\nspec: {{}}"
        ))
    };
    let (_, outcome) = h.admin.apply(router("r0"), "test", false).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Created);
    assert_eq!(h.used("p").await.routers, Some(1));
    // Re-applying the same object changes nothing and is not charged again.
    let (_, outcome) = h.admin.apply(router("r0"), "test", false).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Unchanged);
    let refused = h.admin.apply(router("r1"), "test", true).await;
    exhausted(refused.map(|(o, _)| o));
    let refused = h.admin.apply(router("r1"), "test", false).await;
    exhausted(refused.map(|(o, _)| o));
    assert_eq!(h.used("p").await.routers, Some(1));
}
