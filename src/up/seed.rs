//! The objects every all-in-one cloud starts with: the `default` Project and the `m1.*`
//! Flavors. Applied on every start with manager `ferro-up`, so a restart writes nothing
//! unless someone changed them.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use ferro_api::client::{ApplyOutcome, Client};
use ferro_api::{Error as ApiError, Object, v1};

/// The field manager seeds are applied as.
pub const MANAGER: &str = "ferro-up";

/// The Flavors seeded: name, vCPUs, RAM in MiB, disk in GiB.
pub const FLAVORS: &[(&str, u32, u64, u64)] = &[
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
];

/// The seed objects.
pub fn objects() -> Vec<Object> {
    let meta = |name: &str| {
        Some(v1::ObjectMeta {
            name: name.to_owned(),
            ..Default::default()
        })
    };
    let mut objects = vec![Object::Project(v1::Project {
        metadata: meta(ferro_api::server::DEFAULT_PROJECT),
        spec: Some(v1::ProjectSpec {
            description: "The project objects go to when they name none.".into(),
        }),
        status: None,
    })];
    objects.extend(FLAVORS.iter().map(|(name, vcpus, ram_mib, disk_gib)| {
        Object::Flavor(v1::Flavor {
            metadata: meta(name),
            spec: Some(v1::FlavorSpec {
                vcpus: *vcpus,
                ram_mib: *ram_mib,
                disk_gib: *disk_gib,
                ..Default::default()
            }),
            status: None,
        })
    }));
    objects
}

/// Applies the seed objects, retrying while the apiserver or its store is unavailable.
pub async fn apply(client: &Client) -> anyhow::Result<()> {
    const PATIENCE: Duration = Duration::from_secs(60);
    for object in objects() {
        let label = crate::cli::object_label(object.kind(), object.name());
        let begin = Instant::now();
        loop {
            match client.apply(object.clone(), MANAGER, false).await {
                Ok((_, outcome)) => {
                    if outcome != ApplyOutcome::Unchanged {
                        tracing::info!("seeded {label} ({})", outcome.as_str_name());
                    }
                    break;
                }
                Err(ApiError::Unavailable { message }) if begin.elapsed() < PATIENCE => {
                    tracing::debug!("seeding {label}: {message}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow!("cannot seed {label}: {e}")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid() {
        for mut object in objects() {
            ferro_api::validation::apply_defaults(&mut object);
            ferro_api::validation::validate_create(&object).unwrap();
        }
    }
}
