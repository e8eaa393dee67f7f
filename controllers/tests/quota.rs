//! The quota controller against an in-process apiserver: deletions are given back by the
//! recount, drift is repaired, and racing creates and deletes never take a project over
//! its limit.

mod common;

use common::{Cloud, eventually};
use ferro_api::{Error, Kind, Object, client::Selection, codec, owners, v1};

fn yaml(text: &str) -> Object {
    codec::decode_yaml(&format!("apiVersion: ferro/v1\n{text}\n"))
        .expect("test YAML decodes")
        .remove(0)
}

fn group(name: &str) -> Object {
    yaml(&format!(
        "kind: SecurityGroup\nmetadata: {{name: {name}}}\nspec: {{}}"
    ))
}

async fn quota(cloud: &Cloud, name: &str) -> v1::Quota {
    match cloud.admin.get(Kind::Quota, "default", name).await.unwrap() {
        Object::Quota(q) => q,
        _ => unreachable!("a Quota was asked for"),
    }
}

/// Waits until the Quota records `groups` security groups and is Ready as `reason` says.
async fn counted(cloud: &Cloud, name: &str, groups: i64, reason: &str) -> v1::Quota {
    eventually(
        &format!("quotas/{name} counting {groups} groups"),
        || async {
            let q = quota(cloud, name).await;
            let status = q.status.clone()?;
            let ready = status.conditions.iter().find(|c| c.r#type == "Ready")?;
            (status.used.as_ref()?.security_groups == Some(groups) && ready.reason == reason)
                .then_some(q)
        },
    )
    .await
}

async fn group_count(cloud: &Cloud) -> usize {
    let (items, _) = cloud
        .admin
        .list(Kind::SecurityGroup, &Selection::project("default"))
        .await
        .unwrap();
    items.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_are_given_back_and_drift_is_repaired() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    for name in ["a", "b", "c"] {
        cloud.admin.create(group(name)).await.unwrap();
    }
    // A Quota created over existing objects is counted, and limits further creates.
    cloud
        .create("apiVersion: ferro/v1\nkind: Quota\nmetadata: {name: default}\nspec: {hard: {securityGroups: 3}}\n")
        .await;
    counted(&cloud, "default", 3, "Counted").await;
    let refused = cloud.admin.create(group("d")).await;
    assert!(
        matches!(&refused, Err(Error::ResourceExhausted { message }) if message.contains("securityGroups limit 3, used 3")),
        "{refused:?}"
    );

    // Admission never refunds; the recount gives a deleted group back.
    cloud.delete(Kind::SecurityGroup, "default", "a").await;
    counted(&cloud, "default", 2, "Counted").await;
    cloud.admin.create(group("d")).await.unwrap();
    counted(&cloud, "default", 3, "Counted").await;

    // A usage that drifted (written wrong) is recounted from the objects.
    let mut wrong = quota(&cloud, "default").await;
    wrong.status.get_or_insert_default().used = Some(v1::QuotaAmounts {
        security_groups: Some(99),
        ..Default::default()
    });
    cloud
        .admin
        .update_status(
            Object::Quota(wrong),
            owners::QUOTA_CONTROLLER,
            &["used"],
            vec![],
        )
        .await
        .unwrap();
    counted(&cloud, "default", 3, "Counted").await;

    // A second Quota is counted but says it is not enforced.
    cloud
        .create("apiVersion: ferro/v1\nkind: Quota\nmetadata: {name: extra}\nspec: {hard: {securityGroups: 0}}\n")
        .await;
    let extra = counted(&cloud, "extra", 3, "NotEnforced").await;
    let ready = extra.status.unwrap().conditions;
    assert_eq!(ready[0].status, v1::condition::Status::False as i32);
    controllers.abort();
}

/// Creates race with deletes and with the controller's recounts: the project never holds
/// more than its limit, and the recorded usage settles on what exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recounts_never_let_racing_creates_overshoot() {
    const LIMIT: usize = 5;
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud
        .create(&format!("apiVersion: ferro/v1\nkind: Quota\nmetadata: {{name: default}}\nspec: {{hard: {{securityGroups: {LIMIT}}}}}\n"))
        .await;
    counted(&cloud, "default", 0, "Counted").await;
    let mut existing: Vec<String> = Vec::new();
    for round in 0..6 {
        // Free two slots and race ten creates for them while the recount runs.
        let deletes = existing.drain(..existing.len().min(2)).map(|name| {
            let admin = cloud.admin.clone();
            tokio::spawn(async move {
                admin
                    .delete_key(Kind::SecurityGroup, "default", &name)
                    .await
            })
        });
        let creates = (0..10).map(|i| {
            let admin = cloud.admin.clone();
            let name = format!("r{round}-{i}");
            tokio::spawn(async move { admin.create(group(&name)).await.map(|_| name) })
        });
        let (deleted, created) = futures::future::join(
            futures::future::join_all(deletes),
            futures::future::join_all(creates),
        )
        .await;
        for d in deleted {
            d.unwrap().expect("delete");
        }
        for c in created {
            match c.unwrap() {
                Ok(name) => existing.push(name),
                Err(Error::ResourceExhausted { .. }) => {}
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        let held = group_count(&cloud).await;
        assert!(
            held <= LIMIT,
            "round {round}: {held} groups against a limit of {LIMIT}"
        );
        assert_eq!(held, existing.len(), "round {round}");
    }
    counted(&cloud, "default", existing.len() as i64, "Counted").await;
    controllers.abort();
}
