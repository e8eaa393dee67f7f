//! Apiserver integration tests over real gRPC on loopback, each run against the in-memory
//! store and against a real etcd (Debian's etcd-server, started on free ports and removed
//! afterwards).

use std::{sync::Arc, time::Duration};

use ferro_api::{
    Error, Kind, Object,
    auth::Tokens,
    cache::CacheOptions,
    client::{ApplyOutcome, Client, Selection},
    codec, owners,
    server::ApiServer,
    v1,
};
use ferro_store::{
    Store,
    etcd::EtcdStore,
    etcd_process::{EtcdOptions, EtcdProcess},
    memory::MemoryStore,
};
use futures::StreamExt;
use tokio::sync::oneshot;

/// Events the watch cache keeps per kind in these tests.
const WINDOW: usize = 32;

const TOKENS: &str =
    "admin-token admin\ncontrollers-token system:controllers\nnode1-token system:node:n1\n";

struct Harness {
    address: String,
    store: Arc<dyn Store>,
    admin: Client,
    cached: bool,
    _shutdown: oneshot::Sender<()>,
    _etcd: Option<EtcdProcess>,
}

impl Harness {
    async fn start(etcd: bool) -> Harness {
        Self::start_with(etcd, true).await
    }

    async fn start_with(etcd: bool, cached: bool) -> Harness {
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
        let mut server = ApiServer::new(store.clone(), Tokens::parse(TOKENS));
        server = if cached {
            // A small window, so tests can reach past it.
            server.with_cache_options(CacheOptions {
                window_events: WINDOW,
                ..CacheOptions::default()
            })
        } else {
            server.without_cache()
        };
        tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("apiserver serves");
        });
        let admin = Client::connect_lazy(&address, "admin-token").unwrap();
        Harness {
            address,
            store,
            admin,
            cached,
            _shutdown: tx,
            _etcd: process,
        }
    }

    fn client(&self, token: &str) -> Client {
        Client::connect_lazy(&self.address, token).unwrap()
    }

    async fn revision(&self) -> i64 {
        self.store.current_revision().await.unwrap()
    }
}

fn yaml(text: &str) -> Object {
    let mut objects = codec::decode_yaml(text).expect("test YAML decodes");
    objects.remove(0)
}

fn network(name: &str, labels: &str) -> Object {
    yaml(&format!(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec:\n  subnets:\n  - {{name: a, cidr: 10.0.1.0/24}}\n"
    ))
}

fn server(name: &str) -> Object {
    yaml(&format!(
        "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: m1.tiny, image: cirros, networks: [{{network: private}}]}}\n"
    ))
}

fn meta(object: &Object) -> v1::ObjectMeta {
    object.metadata().cloned().unwrap_or_default()
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start(false).await).await;
                }
            )*
        }
        mod memory_without_cache {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start_with(false, false).await).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::start(true).await).await;
                }
            )*
        }
    };
}

both_backends!(
    create_sets_server_metadata_and_refuses_duplicates,
    apply_bumps_generation_only_for_spec_changes,
    unchanged_apply_writes_nothing,
    applying_get_output_is_a_no_op,
    labels_merge_per_manager,
    stale_update_is_rejected,
    immutable_fields_are_named,
    invalid_objects_write_nothing,
    contradicting_references_write_nothing,
    owner_table_is_enforced,
    bind_happens_once_under_races,
    finalizers_hold_deletion_until_removed,
    propagation_policies_add_their_finalizers,
    delete_preconditions_are_checked,
    watch_replays_from_an_old_revision,
    watch_selectors_synthesize_added_and_deleted,
    expired_revision_gets_the_distinct_error,
    pagination_covers_a_thousand_objects,
    node_token_is_confined,
    missing_or_wrong_token_is_refused,
);

async fn create_sets_server_metadata_and_refuses_duplicates(h: Harness) {
    let created = h.admin.create(network("net-a", "")).await.unwrap();
    let m = meta(&created);
    assert_eq!(m.project, "default");
    assert_eq!(m.generation, 1);
    assert!(!m.uid.is_empty());
    assert!(m.resource_version > 0);
    assert!(m.creation_timestamp.is_some());
    let err = h.admin.create(network("net-a", "")).await.unwrap_err();
    assert_eq!(
        err,
        Error::AlreadyExists {
            object: "networks/net-a".into()
        }
    );
    let got = h
        .admin
        .get(Kind::Network, "default", "net-a")
        .await
        .unwrap();
    assert_eq!(got, created, "get returns what create stored");
}

async fn apply_bumps_generation_only_for_spec_changes(h: Harness) {
    let (first, outcome) = h
        .admin
        .apply(network("net-b", "a: '1'"), "test", false)
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Created);
    assert_eq!(meta(&first).generation, 1);

    let (relabelled, outcome) = h
        .admin
        .apply(network("net-b", "a: '2'"), "test", false)
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Configured);
    assert_eq!(
        meta(&relabelled).generation,
        1,
        "a label change is not a spec change"
    );
    assert!(meta(&relabelled).resource_version > meta(&first).resource_version);

    let mut changed = network("net-b", "a: '2'");
    if let Object::Network(n) = &mut changed {
        n.spec.as_mut().unwrap().mtu = Some(1400);
    }
    let (respecced, outcome) = h.admin.apply(changed, "test", false).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Configured);
    assert_eq!(meta(&respecced).generation, 2);
    assert_eq!(meta(&respecced).uid, meta(&first).uid);
}

async fn unchanged_apply_writes_nothing(h: Harness) {
    h.admin
        .apply(network("net-c", "x: y"), "test", false)
        .await
        .unwrap();
    let before = h.revision().await;
    let (_, outcome) = h
        .admin
        .apply(network("net-c", "x: y"), "test", false)
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Unchanged);
    assert_eq!(
        h.revision().await,
        before,
        "the store revision did not move"
    );

    // dryRun of a change answers Configured and writes nothing either.
    let (would, outcome) = h
        .admin
        .apply(network("net-c", "x: z"), "test", true)
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Configured);
    assert_eq!(meta(&would).labels["x"], "z");
    assert_eq!(h.revision().await, before);
    let stored = h.admin.get(Kind::Network, "", "net-c").await.unwrap();
    assert_eq!(meta(&stored).labels["x"], "y");
}

async fn applying_get_output_is_a_no_op(h: Harness) {
    // An object another manager applied without labels (as `ferro up` seeds flavors).
    let flavor = yaml(
        "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: m1.tiny}\nspec: {vcpus: 1, ramMib: 512}\n",
    );
    h.admin.apply(flavor, "ferro-up", false).await.unwrap();
    let stored = h.admin.get(Kind::Flavor, "", "m1.tiny").await.unwrap();
    let text = codec::to_yaml(std::slice::from_ref(&stored));
    let (_, outcome) = h
        .admin
        .apply(yaml(&text), "ferro-cli", false)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ApplyOutcome::Unchanged,
        "a manager that sets no keys writes nothing"
    );

    h.admin
        .apply(network("net-d", "app: web"), "ferro-cli", false)
        .await
        .unwrap();
    let stored = h.admin.get(Kind::Network, "", "net-d").await.unwrap();
    let text = codec::to_yaml(std::slice::from_ref(&stored));
    let before = h.revision().await;
    let (_, outcome) = h
        .admin
        .apply(yaml(&text), "ferro-cli", false)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ApplyOutcome::Unchanged,
        "get -o yaml | apply:\n{text}"
    );
    assert_eq!(h.revision().await, before);
}

async fn labels_merge_per_manager(h: Harness) {
    h.admin
        .apply(network("net-e", "a: '1', b: '2'"), "alice", false)
        .await
        .unwrap();
    h.admin
        .apply(network("net-e", "c: '3'"), "bob", false)
        .await
        .unwrap();
    let (after, _) = h
        .admin
        .apply(network("net-e", "a: '9'"), "alice", false)
        .await
        .unwrap();
    let labels = meta(&after).labels;
    assert_eq!(labels.get("a").map(String::as_str), Some("9"));
    assert!(!labels.contains_key("b"), "alice dropped b");
    assert_eq!(
        labels.get("c").map(String::as_str),
        Some("3"),
        "bob's label stays"
    );
}

async fn stale_update_is_rejected(h: Harness) {
    let created = h.admin.create(network("net-f", "")).await.unwrap();
    let mut first = created.clone();
    first.metadata_mut().labels.insert("k".into(), "1".into());
    h.admin.update(first).await.unwrap();
    let mut stale = created;
    stale.metadata_mut().labels.insert("k".into(), "2".into());
    let err = h.admin.update(stale).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("networks/net-f: resourceVersion"),
        "{err}"
    );
}

async fn immutable_fields_are_named(h: Harness) {
    let created = h.admin.create(network("net-g", "")).await.unwrap();
    let mut changed = created;
    if let Object::Network(n) = &mut changed {
        n.spec.as_mut().unwrap().subnets[0].cidr = "10.0.2.0/24".into();
    }
    let err = h.admin.update(changed).await.unwrap_err();
    let Error::InvalidArgument { object, violations } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(object, "networks/net-g");
    assert!(
        violations.iter().any(|v| v.path == "spec.subnets[0].cidr"),
        "{err}"
    );
}

async fn invalid_objects_write_nothing(h: Harness) {
    let before = h.revision().await;
    let bad = yaml(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: Bad_Name}\nspec: {subnets: [{name: a, cidr: 10.0.1.1/24}]}\n",
    );
    let err = h.admin.apply(bad, "test", false).await.unwrap_err();
    let Error::InvalidArgument { object, violations } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(object, "networks/Bad_Name");
    assert!(
        violations.iter().any(|v| v.path == "metadata.name"),
        "{err}"
    );
    assert!(
        violations.iter().any(|v| v.path == "spec.subnets[0].cidr"),
        "{err}"
    );
    assert_eq!(h.revision().await, before);
}

/// A Router or FloatingIP that contradicts objects that exist is refused with the field
/// named, by create, apply and update alike, and nothing is written; one that names what
/// does not exist yet is accepted.
async fn contradicting_references_write_nothing(h: Harness) {
    for doc in [
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: public}\nspec: {external: true, subnets: [{name: v4, cidr: 203.0.113.0/24, allocationPools: [{start: 203.0.113.10, end: 203.0.113.20}]}]}\n",
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: private}\nspec: {subnets: [{name: a, cidr: 10.0.1.0/24}]}\n",
        "apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec: {externalGateway: {network: public}, interfaces: [{network: private, subnet: a}]}\n",
    ] {
        h.admin.create(yaml(doc)).await.expect("create");
    }
    let refused = |err: Error| match err {
        Error::InvalidArgument { object, violations } => (
            object,
            violations
                .iter()
                .map(|v| format!("{}: {}", v.path, v.reason))
                .collect::<Vec<_>>(),
        ),
        other => panic!("{other:?}"),
    };
    let before = h.revision().await;
    let second = yaml(
        "apiVersion: ferro/v1\nkind: Router\nmetadata: {name: second}\nspec: {interfaces: [{network: private, subnet: a}]}\n",
    );
    let err = h.admin.create(second.clone()).await.unwrap_err();
    assert_eq!(
        refused(err),
        (
            "routers/second".to_owned(),
            vec!["spec.interfaces[0].subnet: subnet a of network private already has router default/edge".to_owned()]
        )
    );
    let err = h.admin.apply(second, "test", false).await.unwrap_err();
    assert_eq!(refused(err).0, "routers/second");
    let gateway = yaml(
        "apiVersion: ferro/v1\nkind: Router\nmetadata: {name: inside}\nspec: {externalGateway: {network: private}}\n",
    );
    let err = h.admin.apply(gateway, "test", false).await.unwrap_err();
    assert_eq!(
        refused(err).1,
        ["spec.externalGateway.network: network private is not external (spec.external: true)"]
    );
    let fip = yaml(
        "apiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {name: far}\nspec: {network: public, address: 203.0.113.99}\n",
    );
    let err = h.admin.create(fip).await.unwrap_err();
    assert_eq!(
        refused(err).1,
        [
            "spec.address: 203.0.113.99 is outside the allocation pools of subnet v4 (203.0.113.10–203.0.113.20)"
        ]
    );
    assert_eq!(h.revision().await, before, "nothing written");

    // An update that moves the gateway onto the internal network is refused too.
    let Object::Router(mut edge) = h.admin.get(Kind::Router, "default", "edge").await.unwrap()
    else {
        panic!()
    };
    edge.spec
        .as_mut()
        .unwrap()
        .external_gateway
        .as_mut()
        .unwrap()
        .network = "private".into();
    let err = h.admin.update(Object::Router(edge)).await.unwrap_err();
    assert_eq!(
        refused(err).1,
        ["spec.externalGateway.network: network private is not external (spec.external: true)"]
    );
    assert_eq!(h.revision().await, before, "nothing written");

    // What does not exist yet is not refused: the controllers report it.
    h.admin
        .create(yaml(
            "apiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {name: later}\nspec: {network: not-yet, address: 198.51.100.7}\n",
        ))
        .await
        .expect("a missing network is a condition, not a refusal");
}

async fn owner_table_is_enforced(h: Harness) {
    h.admin.create(server("srv-a")).await.unwrap();
    let controllers = h.client("controllers-token");
    let mut patch = server("srv-a");
    if let Object::Server(s) = &mut patch {
        s.status = Some(v1::ServerStatus {
            phase: v1::server_status::Phase::Pending as i32,
            ..Default::default()
        });
    }
    let err = controllers
        .update_status(patch.clone(), owners::AGENT, &["phase"], vec![])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "servers/srv-a: status.phase: owned by server-controller, not agent"
    );
    let ready = v1::Condition {
        r#type: "Ready".into(),
        status: v1::condition::Status::False as i32,
        reason: "Waiting".into(),
        ..Default::default()
    };
    let written = controllers
        .update_status(patch, owners::SERVER_CONTROLLER, &["phase"], vec![ready])
        .await
        .unwrap();
    let Object::Server(s) = written else { panic!() };
    let status = s.status.unwrap();
    assert_eq!(status.phase, v1::server_status::Phase::Pending as i32);
    assert_eq!(status.conditions[0].reason, "Waiting");
    assert!(status.conditions[0].last_transition_time.is_some());
    assert_eq!(
        s.metadata.unwrap().generation,
        1,
        "status writes never bump generation"
    );
}

async fn bind_happens_once_under_races(h: Harness) {
    for node in ["n1", "n2", "n3", "n4"] {
        let text = format!("apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {node}}}\n");
        h.admin.create(yaml(&text)).await.unwrap();
    }
    h.admin.create(server("srv-b")).await.unwrap();
    let flavor = v1::FlavorSnapshot {
        name: "m1.tiny".into(),
        vcpus: 1,
        ram_mib: 512,
        ..Default::default()
    };
    let binds = ["n1", "n2", "n3", "n4"].map(|node| {
        let client = h.client("controllers-token");
        let flavor = flavor.clone();
        tokio::spawn(async move { client.bind("default", "srv-b", node, flavor).await })
    });
    let mut winners = Vec::new();
    for (bind, node) in futures::future::join_all(binds)
        .await
        .into_iter()
        .zip(["n1", "n2", "n3", "n4"])
    {
        match bind.unwrap() {
            Ok(_) => winners.push(node),
            Err(Error::FailedPrecondition { message, .. }) => {
                assert!(message.contains("already bound"), "{message}")
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one bind wins: {winners:?}");
    let Object::Server(s) = h.admin.get(Kind::Server, "", "srv-b").await.unwrap() else {
        panic!()
    };
    let status = s.status.unwrap();
    assert_eq!(status.node, winners[0]);
    assert_eq!(
        status.flavor.unwrap().ram_mib,
        512,
        "node and flavor were written together"
    );
    let scheduled = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Scheduled")
        .expect("the bind records Scheduled");
    assert_eq!(
        (scheduled.status, scheduled.message.as_str()),
        (
            v1::condition::Status::True as i32,
            format!("placed on node {}", winners[0]).as_str()
        ),
        "in the same write as the node"
    );
    assert!(
        s.metadata
            .unwrap()
            .finalizers
            .contains(&"ferro.io/agent".to_owned())
    );
    // A cordoned node takes no new server, whatever the scheduler's cache says.
    h.admin.create(server("srv-d")).await.unwrap();
    let mut n2 = h.admin.get(Kind::Node, "", "n2").await.unwrap();
    if let Object::Node(n) = &mut n2 {
        n.spec.get_or_insert_with(Default::default).unschedulable = true;
    }
    h.admin.update(n2).await.unwrap();
    let err = h
        .admin
        .bind("default", "srv-d", "n2", flavor.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("node n2 is cordoned"), "{err}");
    let err = h
        .admin
        .bind("default", "srv-b", "nope", flavor)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nodes/nope not found"), "{err}");
}

async fn finalizers_hold_deletion_until_removed(h: Harness) {
    let mut object = network("net-h", "");
    object.metadata_mut().finalizers = vec!["example.com/cleanup".into()];
    h.admin.create(object).await.unwrap();
    let (pending, gone) = h
        .admin
        .delete_key(Kind::Network, "", "net-h")
        .await
        .unwrap();
    assert!(!gone);
    assert!(meta(&pending).deletion_timestamp.is_some());
    let err = h
        .admin
        .patch_metadata(v1::PatchMetadataRequest {
            key: Some(v1::ObjectKey {
                kind: "Network".into(),
                project: String::new(),
                name: "net-h".into(),
            }),
            add_finalizers: vec!["example.com/late".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition { .. }),
        "no finalizer after deletion: {err:?}"
    );
    let (again, gone) = h
        .admin
        .delete_key(Kind::Network, "", "net-h")
        .await
        .unwrap();
    assert!(!gone);
    assert_eq!(
        meta(&again).deletion_timestamp,
        meta(&pending).deletion_timestamp,
        "deleting twice changes nothing"
    );
    h.admin
        .patch_metadata(v1::PatchMetadataRequest {
            key: Some(v1::ObjectKey {
                kind: "Network".into(),
                project: String::new(),
                name: "net-h".into(),
            }),
            remove_finalizers: vec!["example.com/cleanup".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = h.admin.get(Kind::Network, "", "net-h").await.unwrap_err();
    assert_eq!(
        err,
        Error::NotFound {
            object: "networks/net-h".into()
        }
    );
}

async fn propagation_policies_add_their_finalizers(h: Harness) {
    use v1::delete_request::Propagation;
    for (name, propagation, finalizer) in [
        (
            "net-i",
            Propagation::Foreground,
            Some("ferro.io/foreground-deletion"),
        ),
        ("net-j", Propagation::Orphan, Some("ferro.io/orphan")),
        ("net-k", Propagation::Background, None),
    ] {
        h.admin.create(network(name, "")).await.unwrap();
        let (object, gone) = h
            .admin
            .delete(v1::DeleteRequest {
                key: Some(v1::ObjectKey {
                    kind: "Network".into(),
                    project: String::new(),
                    name: name.into(),
                }),
                propagation: propagation as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        match finalizer {
            Some(f) => {
                assert!(!gone, "{name}");
                assert!(meta(&object).finalizers.contains(&f.to_owned()), "{name}");
            }
            None => assert!(
                gone,
                "{name}: background deletion of an object without finalizers is immediate"
            ),
        }
    }
}

async fn delete_preconditions_are_checked(h: Harness) {
    let created = h.admin.create(network("net-l", "")).await.unwrap();
    let key = Some(v1::ObjectKey {
        kind: "Network".into(),
        project: String::new(),
        name: "net-l".into(),
    });
    let err = h
        .admin
        .delete(v1::DeleteRequest {
            key: key.clone(),
            precondition_uid: "not-the-uid".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    let (_, gone) = h
        .admin
        .delete(v1::DeleteRequest {
            key,
            precondition_uid: meta(&created).uid,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(gone);
}

async fn watch_replays_from_an_old_revision(h: Harness) {
    let (first, _) = h
        .admin
        .apply(network("net-m", "v: '1'"), "t", false)
        .await
        .unwrap();
    let from = meta(&first).resource_version;
    h.admin
        .apply(network("net-m", "v: '2'"), "t", false)
        .await
        .unwrap();
    h.admin
        .delete_key(Kind::Network, "", "net-m")
        .await
        .unwrap();
    let mut events = h
        .admin
        .watch(Kind::Network, &Selection::project("default"), from)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if event.r#type != v1::watch_event::Type::Bookmark as i32 {
            seen.push(v1::watch_event::Type::try_from(event.r#type).unwrap());
        }
    }
    assert_eq!(
        seen,
        [
            v1::watch_event::Type::Modified,
            v1::watch_event::Type::Deleted
        ]
    );
}

async fn watch_selectors_synthesize_added_and_deleted(h: Harness) {
    use v1::watch_event::Type;
    let mut events = h
        .admin
        .watch(
            Kind::Network,
            &Selection::project("default").labels("tier=web"),
            0,
        )
        .await
        .unwrap();
    h.admin
        .apply(network("net-n", "tier: db"), "t", false)
        .await
        .unwrap();
    h.admin
        .apply(network("net-n", "tier: web"), "t", false)
        .await
        .unwrap();
    h.admin
        .apply(network("net-n", "tier: db"), "t", false)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if event.r#type != Type::Bookmark as i32 {
            seen.push(Type::try_from(event.r#type).unwrap());
        }
    }
    assert_eq!(
        seen,
        [Type::Added, Type::Deleted],
        "start matching → Added; stop matching → Deleted"
    );
}

async fn expired_revision_gets_the_distinct_error(h: Harness) {
    let (first, _) = h
        .admin
        .apply(network("net-o", "v: '0'"), "t", false)
        .await
        .unwrap();
    // Past the cache's window, so the old revision can only come from the store…
    let mut last = first.clone();
    for i in 1..=(WINDOW + 8) {
        last = h
            .admin
            .apply(network("net-o", &format!("v: '{i}'")), "t", false)
            .await
            .unwrap()
            .0;
    }
    // …which no longer has it.
    h.store.compact(meta(&last).resource_version).await.unwrap();
    let mut events = h
        .admin
        .watch(
            Kind::Network,
            &Selection::project("default"),
            meta(&first).resource_version,
        )
        .await
        .unwrap();
    let item = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(item, Err(Error::Expired { .. })), "{item:?}");
    if !h.cached {
        return;
    }
    // A watch from inside the cache's window is served, compaction or not.
    let recent = meta(&last).resource_version - 3;
    let mut events = h
        .admin
        .watch(Kind::Network, &Selection::project("default"), recent)
        .await
        .unwrap();
    let item = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(item.resource_version, recent + 1);
}

async fn pagination_covers_a_thousand_objects(h: Harness) {
    let client = h.client("controllers-token");
    let mut tasks = Vec::new();
    for chunk in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..1000).step_by(16) {
                let text = format!(
                    "apiVersion: ferro/v1\nkind: SegmentID\nmetadata: {{name: vni-{i}}}\nspec: {{id: {}}}\n",
                    i + 1
                );
                client.create(yaml(&text)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut names = std::collections::BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    let mut revision = None;
    loop {
        let page = h
            .admin
            .list_page(Kind::SegmentID, &Selection::all(), 128, &token)
            .await
            .unwrap();
        assert!(page.items.len() <= 128);
        revision.get_or_insert(page.resource_version);
        // Writes between pages do not show up: every page is read at the first one's revision.
        if pages == 0 {
            client.create(yaml("apiVersion: ferro/v1\nkind: SegmentID\nmetadata: {name: vni-late}\nspec: {id: 5000}\n")).await.unwrap();
        }
        pages += 1;
        for item in &page.items {
            assert!(
                names.insert(item.name().to_owned()),
                "{} listed twice",
                item.name()
            );
        }
        if page.continue_token.is_empty() {
            break;
        }
        token = page.continue_token;
    }
    assert_eq!(names.len(), 1000);
    assert_eq!(pages, 8);
    let (all, _) = h
        .admin
        .list(Kind::SegmentID, &Selection::all())
        .await
        .unwrap();
    assert_eq!(all.len(), 1001);
}

async fn node_token_is_confined(h: Harness) {
    let node = h.client("node1-token");
    node.create(yaml(
        "apiVersion: ferro/v1\nkind: Node\nmetadata: {name: n1}\n",
    ))
    .await
    .unwrap();
    let err = node
        .create(yaml(
            "apiVersion: ferro/v1\nkind: Node\nmetadata: {name: n2}\n",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "system:node:n1 may not create nodes/n2");
    let err = node.create(server("srv-c")).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    h.admin.create(server("srv-c")).await.unwrap();
    assert!(
        node.get(Kind::Server, "", "srv-c").await.is_ok(),
        "a node may read servers"
    );
    let err = node
        .delete_key(Kind::Server, "", "srv-c")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");

    // Host status of a server bound elsewhere is refused; bound here, it is allowed.
    let host = |phase| {
        let mut s = server("srv-c");
        if let Object::Server(s) = &mut s {
            s.status = Some(v1::ServerStatus {
                host: Some(v1::ServerHostStatus {
                    power_state: phase,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        s
    };
    let running = v1::server_host_status::PowerState::Running as i32;
    let err = node
        .update_status(host(running), owners::AGENT, &["host"], vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    let flavor = v1::FlavorSnapshot {
        name: "m1.tiny".into(),
        vcpus: 1,
        ram_mib: 512,
        ..Default::default()
    };
    h.admin
        .bind("default", "srv-c", "n1", flavor)
        .await
        .unwrap();
    node.update_status(host(running), owners::AGENT, &["host"], vec![])
        .await
        .unwrap();
    let err = node
        .update_status(host(running), owners::SERVER_CONTROLLER, &["phase"], vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
}

async fn missing_or_wrong_token_is_refused(h: Harness) {
    let before = h.revision().await;
    for token in ["", "wrong"] {
        let client = h.client(token);
        let err = client
            .apply(network("net-p", ""), "t", false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Unauthenticated { .. }),
            "{token:?}: {err:?}"
        );
        let err = client.get(Kind::Network, "", "net-p").await.unwrap_err();
        assert!(
            matches!(err, Error::Unauthenticated { .. }),
            "{token:?}: {err:?}"
        );
    }
    assert_eq!(h.revision().await, before);
}
