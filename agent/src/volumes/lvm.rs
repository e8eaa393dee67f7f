//! The LVM backend: each volume is a logical volume `ferro-<uid>` of one volume group,
//! thick or in a thin pool, opened by QEMU as a raw block device at
//! `/dev/<vg>/ferro-<uid>`.
//!
//! Every command is built by a pure planner (`create_commands`, `resize_commands`,
//! `delete_commands`, `list_command`, `capacity_command`) and the output of `lvs`
//! and `vgs` is read by pure parsers, so the logic is unit-tested without LVM; the
//! backend only runs the commands in order. A create makes `ferro-<uid>.partial`, fills
//! it, and renames it to `ferro-<uid>` (`lvrename`), so an LV under a volume's name is
//! always complete.
//!
//! No byte of an earlier, deleted volume may reach a new one: a thick LV gets extents
//! that held someone else's data, so it is zeroed (`blkdiscard -z`) when made and its
//! new tail when grown; a thin LV reads zeros wherever nothing was written. Image and
//! volume copies (`qemu-img convert -n --target-is-zero -O raw`) then skip the zeros.
//!
//! LVM needs device-mapper; [`LvmBackend::probe`] says whether the host has it (many
//! containers do not), and every call fails with [`VolumeError::Unsupported`] without it.
//! Sizes are rounded up by LVM to whole extents.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{
    Capacity, Content, DiskFormat, UidLocks, VolumeBackend, VolumeError, VolumeInfo, VolumeRequest,
    path_str, run, validate_request, validate_size, validate_uid, virtual_size,
};

/// The device-mapper control node LVM needs.
pub const DM_CONTROL: &str = "/dev/mapper/control";
/// The prefix of the LVs this backend owns.
pub const LV_PREFIX: &str = "ferro-";
/// The suffix of an LV a create is filling.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// How long after its creation a partial LV is taken for the remains of a crash by
/// [`VolumeBackend::collect_leftovers`].
pub const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// Substrings LVM reserves for its internal LVs; an LV name holding one is refused.
const RESERVED: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog",
    "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig", "_vdo",
];

/// Where an [`LvmBackend`] puts its volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmConfig {
    /// The volume group.
    pub volume_group: String,
    /// A thin pool of the volume group to make thin volumes in; thick volumes without.
    pub thin_pool: Option<String>,
    /// `qemu-img`, to copy images and volumes.
    pub qemu_img: PathBuf,
}

/// Volumes as logical volumes. Cheap to create; any number of backends may look at the
/// same volume group.
#[derive(Debug)]
pub struct LvmBackend {
    config: LvmConfig,
    locks: UidLocks,
}

impl LvmBackend {
    /// A backend on this volume group (which must exist; Ferro does not make it).
    pub fn new(config: LvmConfig) -> Self {
        LvmBackend {
            config,
            locks: UidLocks::default(),
        }
    }

    /// Whether this host can run LVM volumes at all: device-mapper's control node must
    /// open. [`VolumeError::Unsupported`] says why not.
    pub fn probe() -> Result<(), VolumeError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DM_CONTROL)
            .map(drop)
            .map_err(|e| {
                VolumeError::Unsupported(format!(
                    "device-mapper is not available: {DM_CONTROL} cannot be opened ({e})"
                ))
            })
    }

    /// The backend's settings.
    pub fn config(&self) -> &LvmConfig {
        &self.config
    }

    /// The block device of volume `uid` (whether or not it exists).
    pub fn volume_path(&self, uid: &str) -> PathBuf {
        device(&self.config.volume_group, &lv_name(uid))
    }

    /// Every LV of the volume group, with its size, from `lvs`.
    async fn lvs(&self) -> Result<Vec<(String, u64)>, VolumeError> {
        let out = run_planned(list_command(&self.config)).await?;
        parse_lvs(&out).map_err(|e| unreadable("lvs", e))
    }

    async fn observe(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        let name = lv_name(uid);
        Ok(self
            .lvs()
            .await?
            .into_iter()
            .find(|(lv, _)| *lv == name)
            .map(|(_, size_bytes)| self.info(uid, size_bytes)))
    }

    fn info(&self, uid: &str, size_bytes: u64) -> VolumeInfo {
        VolumeInfo {
            uid: uid.to_owned(),
            size_bytes,
            path: self.volume_path(uid),
            format: DiskFormat::Raw,
        }
    }

    async fn grow(&self, volume: VolumeInfo, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        if size_bytes < volume.size_bytes {
            return Err(VolumeError::Shrink {
                uid: volume.uid,
                from: volume.size_bytes,
                to: size_bytes,
            });
        }
        if size_bytes == volume.size_bytes {
            return Ok(volume);
        }
        for command in resize_commands(&self.config, &volume.uid, volume.size_bytes, size_bytes) {
            run_planned(command).await?;
        }
        self.observe(&volume.uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(volume.uid.clone()))
    }

    /// The source of a copy, as (path, format, its size).
    async fn source(
        &self,
        content: &Content,
    ) -> Result<Option<(PathBuf, DiskFormat, u64, String)>, VolumeError> {
        match content {
            Content::Empty => Ok(None),
            Content::Image { path, format } => {
                let name = format!("image {}", path.display());
                if !path.exists() {
                    return Err(VolumeError::SourceNotFound(name));
                }
                path_str("content.image.path", path)?;
                let size = virtual_size(&self.config.qemu_img, path, *format).await?;
                Ok(Some((path.clone(), *format, size, name)))
            }
            Content::Volume { uid } => {
                let source = self
                    .observe(uid)
                    .await?
                    .ok_or_else(|| VolumeError::SourceNotFound(format!("volume {uid}")))?;
                Ok(Some((
                    source.path,
                    DiskFormat::Raw,
                    source.size_bytes,
                    format!("volume {uid}"),
                )))
            }
        }
    }

    /// LVs whose name says they are a create in progress, with the uid they are for.
    fn partial_uids(lvs: &[(String, u64)]) -> Vec<String> {
        lvs.iter()
            .filter_map(|(lv, _)| partial_uid(lv).map(str::to_owned))
            .collect()
    }
}

/// The LV of volume `uid`.
pub fn lv_name(uid: &str) -> String {
    format!("{LV_PREFIX}{uid}")
}

/// The LV a create of volume `uid` fills before renaming it.
pub fn partial_lv_name(uid: &str) -> String {
    format!("{LV_PREFIX}{uid}{PARTIAL_SUFFIX}")
}

/// The uid of a volume LV's name, if it is one.
fn volume_uid(lv: &str) -> Option<&str> {
    let uid = lv.strip_prefix(LV_PREFIX)?;
    validate_uid("uid", uid).ok().map(|()| uid)
}

/// The uid of a partial LV's name, if it is one.
fn partial_uid(lv: &str) -> Option<&str> {
    volume_uid(lv.strip_suffix(PARTIAL_SUFFIX)?)
}

fn device(vg: &str, lv: &str) -> PathBuf {
    Path::new("/dev").join(vg).join(lv)
}

fn device_str(vg: &str, lv: &str) -> String {
    format!("/dev/{vg}/{lv}")
}

/// Refuses uids that would make an LV name LVM rejects.
fn validate_lv_uid(field: &'static str, uid: &str) -> Result<(), VolumeError> {
    validate_uid(field, uid)?;
    if let Some(reserved) = RESERVED.iter().find(|r| uid.contains(*r)) {
        return Err(VolumeError::InvalidRequest {
            field,
            reason: format!("{uid:?} holds {reserved:?}, which LVM reserves"),
        });
    }
    Ok(())
}

/// The commands that make volume `uid` of `size_bytes`, filled from `source` (a raw or
/// qcow2 file or device path and its format) when there is one, and give it its name.
fn create_commands(
    config: &LvmConfig,
    uid: &str,
    size_bytes: u64,
    source: Option<(&str, DiskFormat)>,
) -> Vec<Vec<String>> {
    let vg = config.volume_group.as_str();
    let partial = partial_lv_name(uid);
    let target = device_str(vg, &partial);
    let mut commands = vec![match &config.thin_pool {
        Some(pool) => strings(&[
            "lvcreate",
            "-q",
            "-y",
            "-V",
            &format!("{size_bytes}b"),
            "-T",
            &format!("{vg}/{pool}"),
            "-n",
            &partial,
        ]),
        None => strings(&[
            "lvcreate",
            "-q",
            "-y",
            "-L",
            &format!("{size_bytes}b"),
            "-n",
            &partial,
            vg,
        ]),
    }];
    if config.thin_pool.is_none() {
        // Thick extents keep whatever an earlier LV wrote there.
        commands.push(strings(&["blkdiscard", "-f", "-z", &target]));
    }
    if let Some((path, format)) = source {
        commands.push(strings(&[
            &config.qemu_img.to_string_lossy(),
            "convert",
            "-q",
            "-n",
            "--target-is-zero",
            "-f",
            format.as_str(),
            "-O",
            "raw",
            path,
            &target,
        ]));
    }
    commands.push(strings(&["lvrename", vg, &partial, &lv_name(uid)]));
    commands
}

/// The commands that grow volume `uid` from `from_bytes` to `to_bytes`.
fn resize_commands(
    config: &LvmConfig,
    uid: &str,
    from_bytes: u64,
    to_bytes: u64,
) -> Vec<Vec<String>> {
    let vg = config.volume_group.as_str();
    let lv = lv_name(uid);
    let mut commands = vec![strings(&[
        "lvextend",
        "-q",
        "-L",
        &format!("{to_bytes}b"),
        &format!("{vg}/{lv}"),
    ])];
    if config.thin_pool.is_none() {
        commands.push(strings(&[
            "blkdiscard",
            "-f",
            "-z",
            "-o",
            &from_bytes.to_string(),
            &device_str(vg, &lv),
        ]));
    }
    commands
}

/// The commands that remove LV `lv`.
fn delete_commands(config: &LvmConfig, lv: &str) -> Vec<Vec<String>> {
    vec![strings(&[
        "lvremove",
        "-q",
        "-y",
        &format!("{}/{lv}", config.volume_group),
    ])]
}

/// `lvs` of every LV of the volume group, with names, sizes in bytes and creation times.
fn list_command(config: &LvmConfig) -> Vec<String> {
    strings(&[
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "lv_name,lv_size",
        &config.volume_group,
    ])
}

/// `lvs` of the thin pool, or `vgs` of the volume group, for [`parse_capacity`].
fn capacity_command(config: &LvmConfig) -> Vec<String> {
    let vg = config.volume_group.as_str();
    match &config.thin_pool {
        Some(pool) => strings(&[
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_size,data_percent",
            &format!("{vg}/{pool}"),
        ]),
        None => strings(&[
            "vgs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_size,vg_free",
            vg,
        ]),
    }
}

/// `lvs` of one LV's creation time, for [`VolumeBackend::collect_leftovers`].
fn lv_time_command(config: &LvmConfig, lv: &str) -> Vec<String> {
    strings(&[
        "lvs",
        "--reportformat",
        "json",
        "-o",
        "lv_time",
        "--config",
        "report/time_format=\"%s\"",
        &format!("{}/{lv}", config.volume_group),
    ])
}

/// The rows of an `lvs`/`vgs` JSON report (`{"report":[{"lv":[{...}]}]}`).
fn report_rows<'a>(json: &'a Value, kind: &str) -> Result<&'a Vec<Value>, String> {
    json["report"]
        .as_array()
        .and_then(|reports| reports.first())
        .and_then(|report| report[kind].as_array())
        .ok_or_else(|| format!("no report.{kind} in the output"))
}

/// A size field: bytes, with or without the `B` suffix.
fn bytes_field(row: &Value, field: &str) -> Result<u64, String> {
    let text = row[field]
        .as_str()
        .ok_or_else(|| format!("no {field} in {row}"))?;
    let digits = text.trim().trim_end_matches(['B', 'b']);
    digits
        .parse()
        .map_err(|_| format!("{field} {text:?} is not a number of bytes"))
}

/// The LVs and their sizes in an `lvs --reportformat json -o lv_name,lv_size --units b`
/// report.
fn parse_lvs(output: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let json: Value = serde_json::from_slice(output).map_err(|e| e.to_string())?;
    report_rows(&json, "lv")?
        .iter()
        .map(|row| {
            let name = row["lv_name"]
                .as_str()
                .ok_or_else(|| format!("no lv_name in {row}"))?;
            Ok((name.to_owned(), bytes_field(row, "lv_size")?))
        })
        .collect()
}

/// The capacity in a [`capacity_command`] report: a thin pool's size and how much of its
/// data space is unused, or a volume group's size and free bytes.
fn parse_capacity(output: &[u8], thin: bool) -> Result<Capacity, String> {
    let json: Value = serde_json::from_slice(output).map_err(|e| e.to_string())?;
    let (kind, total_field) = if thin {
        ("lv", "lv_size")
    } else {
        ("vg", "vg_size")
    };
    let row = report_rows(&json, kind)?
        .first()
        .ok_or_else(|| format!("an empty {kind} report"))?;
    let total_bytes = bytes_field(row, total_field)?;
    let free_bytes = if thin {
        let text = row["data_percent"].as_str().unwrap_or("").trim();
        let used: f64 = if text.is_empty() {
            0.0
        } else {
            text.parse()
                .map_err(|_| format!("data_percent {text:?} is not a number"))?
        };
        let used_bytes = (total_bytes as f64 * used.clamp(0.0, 100.0) / 100.0).round() as u64;
        total_bytes.saturating_sub(used_bytes)
    } else {
        bytes_field(row, "vg_free")?
    };
    Ok(Capacity {
        total_bytes,
        free_bytes,
    })
}

/// An LV's creation time in a [`lv_time_command`] report (seconds since the epoch).
fn parse_lv_time(output: &[u8]) -> Result<SystemTime, String> {
    let json: Value = serde_json::from_slice(output).map_err(|e| e.to_string())?;
    let row = report_rows(&json, "lv")?
        .first()
        .ok_or_else(|| "an empty lv report".to_owned())?;
    let text = row["lv_time"]
        .as_str()
        .ok_or_else(|| format!("no lv_time in {row}"))?;
    let secs: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("lv_time {text:?} is not seconds"))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// Runs one planned command (program first).
async fn run_planned(command: Vec<String>) -> Result<Vec<u8>, VolumeError> {
    let (program, args) = command
        .split_first()
        .expect("planned commands are not empty");
    run(program, args).await
}

fn unreadable(program: &str, reason: String) -> VolumeError {
    VolumeError::Command {
        program: program.to_owned(),
        status: "0".into(),
        stderr: format!("unreadable report: {reason}"),
    }
}

#[async_trait::async_trait]
impl VolumeBackend for LvmBackend {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    async fn create(&self, request: &VolumeRequest) -> Result<VolumeInfo, VolumeError> {
        validate_request(request)?;
        validate_lv_uid("uid", &request.uid)?;
        Self::probe()?;
        let uid = request.uid.as_str();
        let _guard = self.locks.lock(uid).await;
        let lvs = self.lvs().await?;
        if let Some((_, size)) = lvs.iter().find(|(lv, _)| *lv == lv_name(uid)) {
            let volume = self.info(uid, *size);
            return if request.size_bytes > volume.size_bytes {
                self.grow(volume, request.size_bytes).await
            } else {
                Ok(volume)
            };
        }
        if Self::partial_uids(&lvs).iter().any(|p| p == uid) {
            tracing::info!(uid, "removing the remains of an interrupted create");
            for command in delete_commands(&self.config, &partial_lv_name(uid)) {
                run_planned(command).await?;
            }
        }
        let source = self.source(&request.content).await?;
        if let Some((_, _, source_size, name)) = &source
            && *source_size > request.size_bytes
        {
            return Err(VolumeError::InvalidRequest {
                field: "size_bytes",
                reason: format!(
                    "{} bytes is smaller than the {source_size} bytes of {name}",
                    request.size_bytes
                ),
            });
        }
        let source_path = match &source {
            Some((path, format, _, _)) => Some((path_str("content", path)?, *format)),
            None => None,
        };
        let commands = create_commands(&self.config, uid, request.size_bytes, source_path);
        let started = std::time::Instant::now();
        for (i, command) in commands.into_iter().enumerate() {
            if let Err(e) = run_planned(command).await {
                // Everything before the rename works on the partial LV; drop it.
                if i > 0 {
                    for cleanup in delete_commands(&self.config, &partial_lv_name(uid)) {
                        let _ = run_planned(cleanup).await;
                    }
                }
                return Err(e);
            }
        }
        tracing::info!(
            uid,
            size_bytes = request.size_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "volume created"
        );
        self.observe(uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(uid.to_owned()))
    }

    async fn get(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        validate_uid("uid", uid)?;
        Self::probe()?;
        self.observe(uid).await
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        Self::probe()?;
        let mut volumes: Vec<VolumeInfo> = self
            .lvs()
            .await?
            .into_iter()
            .filter_map(|(lv, size)| volume_uid(&lv).map(|uid| self.info(uid, size)))
            .collect();
        volumes.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(volumes)
    }

    async fn resize(&self, uid: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        validate_uid("uid", uid)?;
        validate_size(size_bytes)?;
        Self::probe()?;
        let _guard = self.locks.lock(uid).await;
        let volume = self
            .observe(uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(uid.to_owned()))?;
        self.grow(volume, size_bytes).await
    }

    async fn delete(&self, uid: &str) -> Result<(), VolumeError> {
        validate_uid("uid", uid)?;
        Self::probe()?;
        let _guard = self.locks.lock(uid).await;
        let lvs = self.lvs().await?;
        for lv in [lv_name(uid), partial_lv_name(uid)] {
            if lvs.iter().any(|(name, _)| *name == lv) {
                for command in delete_commands(&self.config, &lv) {
                    run_planned(command).await?;
                }
                tracing::info!(uid, lv, "logical volume removed");
            }
        }
        Ok(())
    }

    async fn capacity(&self) -> Result<Capacity, VolumeError> {
        Self::probe()?;
        let out = run_planned(capacity_command(&self.config)).await?;
        parse_capacity(&out, self.config.thin_pool.is_some()).map_err(|e| unreadable("lvs/vgs", e))
    }

    async fn collect_leftovers(&self) -> Result<Vec<String>, VolumeError> {
        Self::probe()?;
        let mut removed = Vec::new();
        for uid in Self::partial_uids(&self.lvs().await?) {
            let Some(_guard) = self.locks.try_lock(&uid) else {
                continue;
            };
            let lv = partial_lv_name(&uid);
            let out = run_planned(lv_time_command(&self.config, &lv)).await?;
            let made = parse_lv_time(&out).map_err(|e| unreadable("lvs", e))?;
            let age = SystemTime::now().duration_since(made).unwrap_or_default();
            if age < LEFTOVER_AGE {
                continue;
            }
            for command in delete_commands(&self.config, &lv) {
                run_planned(command).await?;
            }
            tracing::info!(uid, lv, "removed the remains of an interrupted create");
            removed.push(format!("{}/{lv}", self.config.volume_group));
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thick() -> LvmConfig {
        LvmConfig {
            volume_group: "vg0".into(),
            thin_pool: None,
            qemu_img: "qemu-img".into(),
        }
    }

    fn thin() -> LvmConfig {
        LvmConfig {
            thin_pool: Some("pool".into()),
            ..thick()
        }
    }

    fn lines(commands: &[Vec<String>]) -> Vec<String> {
        commands.iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn an_empty_thin_volume_is_made_in_the_pool_and_renamed() {
        assert_eq!(
            lines(&create_commands(&thin(), "v1", 1 << 30, None)),
            [
                "lvcreate -q -y -V 1073741824b -T vg0/pool -n ferro-v1.partial",
                "lvrename vg0 ferro-v1.partial ferro-v1",
            ]
        );
    }

    #[test]
    fn a_thick_volume_is_zeroed_before_anything_is_copied_in() {
        assert_eq!(
            lines(&create_commands(
                &thick(),
                "v1",
                2 << 30,
                Some(("/cache/sha256/ab", DiskFormat::Qcow2))
            )),
            [
                "lvcreate -q -y -L 2147483648b -n ferro-v1.partial vg0",
                "blkdiscard -f -z /dev/vg0/ferro-v1.partial",
                "qemu-img convert -q -n --target-is-zero -f qcow2 -O raw /cache/sha256/ab \
                 /dev/vg0/ferro-v1.partial",
                "lvrename vg0 ferro-v1.partial ferro-v1",
            ]
        );
    }

    #[test]
    fn a_thin_clone_copies_the_source_device() {
        assert_eq!(
            lines(&create_commands(
                &thin(),
                "v2",
                1 << 30,
                Some(("/dev/vg0/ferro-v1", DiskFormat::Raw))
            )),
            [
                "lvcreate -q -y -V 1073741824b -T vg0/pool -n ferro-v2.partial",
                "qemu-img convert -q -n --target-is-zero -f raw -O raw /dev/vg0/ferro-v1 \
                 /dev/vg0/ferro-v2.partial",
                "lvrename vg0 ferro-v2.partial ferro-v2",
            ]
        );
    }

    #[test]
    fn growing_a_thick_volume_zeroes_its_new_tail() {
        assert_eq!(
            lines(&resize_commands(&thick(), "v1", 1 << 30, 2 << 30)),
            [
                "lvextend -q -L 2147483648b vg0/ferro-v1",
                "blkdiscard -f -z -o 1073741824 /dev/vg0/ferro-v1",
            ]
        );
        assert_eq!(
            lines(&resize_commands(&thin(), "v1", 1 << 30, 2 << 30)),
            ["lvextend -q -L 2147483648b vg0/ferro-v1"]
        );
    }

    #[test]
    fn removal_and_reports_name_the_volume_group() {
        assert_eq!(
            lines(&delete_commands(&thick(), "ferro-v1")),
            ["lvremove -q -y vg0/ferro-v1"]
        );
        assert_eq!(
            list_command(&thin()).join(" "),
            "lvs --reportformat json --units b --nosuffix -o lv_name,lv_size vg0"
        );
        assert_eq!(
            capacity_command(&thin()).join(" "),
            "lvs --reportformat json --units b --nosuffix -o lv_size,data_percent vg0/pool"
        );
        assert_eq!(
            capacity_command(&thick()).join(" "),
            "vgs --reportformat json --units b --nosuffix -o vg_size,vg_free vg0"
        );
    }

    #[test]
    fn lvs_reports_are_read_with_or_without_the_unit_suffix() {
        let report = br#"{
              "report": [
                  {
                      "lv": [
                          {"lv_name":"pool", "lv_size":"10737418240"},
                          {"lv_name":"ferro-v1", "lv_size":"1073741824B"},
                          {"lv_name":"ferro-v2.partial", "lv_size":"4194304"},
                          {"lv_name":"root", "lv_size":"8589934592"}
                      ]
                  }
              ]
          }"#;
        let lvs = parse_lvs(report).expect("parsed");
        assert_eq!(
            lvs,
            [
                ("pool".to_owned(), 10737418240),
                ("ferro-v1".to_owned(), 1073741824),
                ("ferro-v2.partial".to_owned(), 4194304),
                ("root".to_owned(), 8589934592),
            ]
        );
        let volumes: Vec<_> = lvs.iter().filter_map(|(lv, _)| volume_uid(lv)).collect();
        assert_eq!(volumes, ["v1"]);
        assert_eq!(LvmBackend::partial_uids(&lvs), ["v2"]);
        assert!(parse_lvs(br#"{"report":[{"lv":[{"lv_name":"x","lv_size":"1.5g"}]}]}"#).is_err());
        assert!(parse_lvs(b"  WARNING: not json").is_err());
        assert_eq!(parse_lvs(br#"{"report":[{"lv":[]}]}"#).expect("parsed"), []);
    }

    #[test]
    fn capacity_is_the_pool_data_left_or_the_group_free_space() {
        let pool = br#"{"report":[{"lv":[{"lv_size":"1000000", "data_percent":"25.00"}]}]}"#;
        assert_eq!(
            parse_capacity(pool, true).expect("parsed"),
            Capacity {
                total_bytes: 1_000_000,
                free_bytes: 750_000
            }
        );
        let vg = br#"{"report":[{"vg":[{"vg_size":"4290772992", "vg_free":"4286578688"}]}]}"#;
        assert_eq!(
            parse_capacity(vg, false).expect("parsed"),
            Capacity {
                total_bytes: 4290772992,
                free_bytes: 4286578688
            }
        );
        assert!(parse_capacity(br#"{"report":[{"vg":[]}]}"#, false).is_err());
    }

    #[test]
    fn lv_creation_times_are_read_as_seconds() {
        assert_eq!(
            lv_time_command(&thin(), "ferro-v1.partial").join(" "),
            "lvs --reportformat json -o lv_time --config report/time_format=\"%s\" \
             vg0/ferro-v1.partial"
        );
        assert_eq!(
            parse_lv_time(br#"{"report":[{"lv":[{"lv_time":"1700000000"}]}]}"#),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn names_lvm_reserves_are_refused() {
        assert!(validate_lv_uid("uid", "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01").is_ok());
        assert!(validate_lv_uid("uid", "data_tmeta").is_err());
        assert_eq!(lv_name("v1"), "ferro-v1");
        assert_eq!(partial_lv_name("v1"), "ferro-v1.partial");
        let backend = LvmBackend::new(thin());
        assert_eq!(backend.volume_path("v1"), Path::new("/dev/vg0/ferro-v1"));
    }

    #[test]
    fn without_device_mapper_the_backend_says_so() {
        match LvmBackend::probe() {
            Ok(()) => assert!(Path::new(DM_CONTROL).exists()),
            Err(e) => {
                assert_eq!(e.reason(), "Unsupported");
                assert!(
                    e.to_string()
                        .starts_with("device-mapper is not available: /dev/mapper/control"),
                    "{e}"
                );
            }
        }
    }
}
