//! `ferro bench storage`: what moving image bytes through Ferro costs.
//!
//! One run starts, through the [`harness`](super::harness), a real etcd and a real
//! `ferro apiserver` child process with its image store in the scratch directory, writes a
//! file of `--size-mib` pseudo-random bytes (1 GiB by default; random so that nothing
//! downstream can shortcut zeros), and measures:
//! 1. the floor: hashing the file with sha256 in this process (the apiserver hashes every
//!    uploaded byte once; the file is in the page cache by then, as it is after writing);
//! 2. `ferro image upload`'s path, in process: upload throughput from the file to the
//!    stored, hashed, fsynced bytes, and the apiserver's peak resident memory (VmHWM)
//!    before and after — memory must stay flat whatever the image size;
//! 3. a node's read back: a `Download` of the whole image, throughput.
//!
//! The figures are gathered in [`StorageFigures`], one optional group per phase, so that
//! the volume attach / NBD figures can join them.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::harness::{self, Apiserver, Etcd, Figures, Workspace, mib};
use crate::cli::image::upload_file;
use ferro_api::v1;

/// The knobs of the storage benchmark.
#[derive(Clone, Debug, clap::Args)]
pub struct StorageBenchArgs {
    /// The size of the uploaded image, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Where the scratch directory goes (etcd, the image store, the generated file;
    /// removed afterwards); the system's temporary directory by default. Put it on the
    /// disk whose speed is wanted: the upload writes and fsyncs every byte.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The aim for upload throughput on loopback, in MiB/s.
const UPLOAD_AIM_MIB_S: f64 = 300.0;
/// The aim for the apiserver's memory growth during an upload, in MiB.
const RSS_AIM_MIB: f64 = 64.0;

/// What one upload cost.
pub struct UploadFigures {
    /// The image's size.
    pub bytes: u64,
    /// sha256 of the same bytes in this process.
    pub hash_floor: Duration,
    /// From the first byte sent to the Image recorded.
    pub upload: Duration,
    /// The apiserver's VmHWM before the upload, in KiB.
    pub rss_before_kib: u64,
    /// Its VmHWM after, in KiB.
    pub rss_after_kib: u64,
    /// A whole Download of the image.
    pub download: Duration,
}

/// Everything one run measured.
#[derive(Default)]
pub struct StorageFigures {
    /// The image upload and read-back, when measured.
    pub upload: Option<UploadFigures>,
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / took.as_secs_f64().max(1e-9)
}

impl fmt::Display for StorageFigures {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut figures = Figures::new(out, 44, format_args!("ferro bench storage"))?;
        if let Some(u) = &self.upload {
            let size = u.bytes as f64 / f64::from(1 << 20);
            figures.line(
                "sha256 of the file in process (floor)",
                format_args!("{:>8.0} MiB/s", mib_per_s(u.bytes, u.hash_floor)),
            )?;
            figures.line(
                &format!("upload of {size:.0} MiB (ferro image upload)"),
                format_args!(
                    "{:>8.0} MiB/s ({:.2} s)",
                    mib_per_s(u.bytes, u.upload),
                    u.upload.as_secs_f64()
                ),
            )?;
            let growth = u.rss_after_kib.saturating_sub(u.rss_before_kib);
            figures.line(
                "apiserver peak RSS (VmHWM) before → after",
                format_args!(
                    "{} → {} (+{})",
                    mib(u.rss_before_kib),
                    mib(u.rss_after_kib),
                    mib(growth)
                ),
            )?;
            figures.line(
                "download of the image (a node's fetch)",
                format_args!(
                    "{:>8.0} MiB/s ({:.2} s)",
                    mib_per_s(u.bytes, u.download),
                    u.download.as_secs_f64()
                ),
            )?;
            let upload_met = mib_per_s(u.bytes, u.upload) >= UPLOAD_AIM_MIB_S;
            let rss_met = (growth as f64 / 1024.0) < RSS_AIM_MIB;
            figures.note(format_args!(
                "aims: upload ≥ {UPLOAD_AIM_MIB_S:.0} MiB/s ({}), RSS growth < {RSS_AIM_MIB:.0} MiB ({})",
                if upload_met { "met" } else { "NOT met" },
                if rss_met { "met" } else { "NOT met" },
            ))?;
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: StorageBenchArgs) -> Result<()> {
    if args.size_mib == 0 {
        bail!("--size-mib must be at least 1");
    }
    let work = Workspace::new("storage", args.work_dir.as_deref())?;
    println!(
        "ferro bench storage: etcd, apiserver and image store under {}",
        work.path().display()
    );
    let etcd = Etcd::start(work.path().join("etcd")).await?;
    let tokens = harness::token_file(work.path(), &[])?;
    let apiserver = Apiserver::start(work.path(), &etcd, &tokens).await?;
    let admin = apiserver.admin()?;

    let file = work.path().join("image.raw");
    let bytes = args.size_mib << 20;
    let path = file.clone();
    tokio::task::spawn_blocking(move || write_random(&path, bytes)).await??;
    let path = file.clone();
    let hash_floor = tokio::task::spawn_blocking(move || hash_file(&path)).await??;

    let rss_before_kib = apiserver.peak_rss_kib()?;
    let target = v1::UploadTarget {
        name: "bench".into(),
        disk_format: Some(v1::image_spec::DiskFormat::Raw as i32),
        ..Default::default()
    };
    let uploaded = upload_file(&admin, target, &file, |_| {}).await?;
    let rss_after_kib = apiserver.peak_rss_kib()?;
    if uploaded.bytes != bytes {
        bail!("uploaded {} bytes of {bytes}", uploaded.bytes);
    }

    let began = Instant::now();
    let mut stream = admin.download_image("default", "bench", 0).await?;
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        read += chunk?.data.len() as u64;
    }
    let download = began.elapsed();
    if read != bytes {
        bail!("downloaded {read} bytes of {bytes}");
    }

    let figures = StorageFigures {
        upload: Some(UploadFigures {
            bytes,
            hash_floor,
            upload: uploaded.took,
            rss_before_kib,
            rss_after_kib,
            download,
        }),
    };
    println!("{figures}");
    Ok(())
}

/// Writes `bytes` pseudo-random bytes (xorshift, fast and incompressible enough) to
/// `path`.
fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// How long hashing `path` takes.
fn hash_file(path: &Path) -> Result<Duration> {
    let began = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let _ = hasher.finalize();
    Ok(began.elapsed())
}
