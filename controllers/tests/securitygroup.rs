//! The security group controller against an in-process apiserver over the in-memory
//! store: every Project gets a `default` group, gets it back when it is deleted, and loses
//! it with the Project.

mod common;

use common::{Cloud, eventually, uid};
use ferro_api::{Kind, client::Selection, v1};

async fn default_group(cloud: &Cloud, project: &str) -> Option<v1::SecurityGroup> {
    cloud
        .admin
        .get_typed::<v1::SecurityGroup>(project, "default")
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_project_has_a_default_group_until_it_goes() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    let project = cloud
        .create("apiVersion: ferro/v1\nkind: Project\nmetadata: {name: team}\n")
        .await;
    let group = eventually("team's default group", || default_group(&cloud, "team")).await;
    let owner = &group.metadata.as_ref().unwrap().owner_references[0];
    let project_uid = project.metadata().unwrap().uid.clone();
    assert_eq!((owner.kind.as_str(), &owner.uid), ("Project", &project_uid));
    let rules = &group.spec.as_ref().unwrap().rules;
    assert_eq!(rules.len(), 4);
    assert!(
        rules
            .iter()
            .filter(|r| r.direction() == v1::security_group_rule::Direction::Ingress)
            .all(|r| r.remote_group == "default"),
        "ingress only from members: {rules:?}"
    );
    // A group of another project is not touched, and no project gets two.
    let others = cloud
        .admin
        .list(Kind::SecurityGroup, &Selection::all())
        .await
        .unwrap()
        .0;
    assert_eq!(others.len(), 1);

    // Deleted by hand: made again.
    cloud.delete(Kind::SecurityGroup, "team", "default").await;
    eventually("a new default group", || async {
        let again = default_group(&cloud, "team").await?;
        (uid(&again) != uid(&group)).then_some(())
    })
    .await;

    // The project goes: so does its group.
    cloud.delete(Kind::Project, "", "team").await;
    eventually("the group gone with the project", || async {
        default_group(&cloud, "team").await.is_none().then_some(())
    })
    .await;
    controllers.abort();
}
