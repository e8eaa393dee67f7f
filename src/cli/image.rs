//! `ferro image upload NAME FILE`: sends an image's bytes to the apiserver's image store.
//!
//! The file is read in [`CHUNK_BYTES`] pieces by a blocking reader thread and streamed as
//! one client-streaming `Upload` call; a channel of a few chunks between the two is all the
//! memory it takes, whatever the file's size. The Image is created (`source.url:
//! ferro://upload`, the given `--disk-format` and `--checksum`) unless it exists already,
//! as an apply of its manifest makes it; then its spec is the manifest's, and the bytes
//! must agree with its `checksum` and `diskFormat`. The apiserver checks the format from
//! the file's header and the sha256 as it stores the bytes; nothing is stored unless the
//! whole file arrives, so running the same command again after an interruption completes
//! it. On a terminal a progress line shows what was sent.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferro_api::imagestore::CHUNK_BYTES;
use ferro_api::v1::image_spec::DiskFormat;
use ferro_api::{Object, v1};

use super::{Connection, ConnectionArgs};

/// Arguments of `ferro image`.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ImageAction,
}

/// The image verbs.
#[derive(clap::Subcommand, Debug)]
pub enum ImageAction {
    /// Upload a file as an Image's bytes, creating the Image (source ferro://upload) when
    /// it does not exist.
    Upload(UploadArgs),
}

/// Arguments of `ferro image upload`.
#[derive(clap::Args, Debug)]
pub struct UploadArgs {
    /// The Image's name.
    pub name: String,
    /// The file to upload.
    pub file: PathBuf,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// The format of the file: auto (what its header shows), raw, qcow2, vmdk, vdi, vhdx,
    /// iso, kernel or ramdisk. The apiserver refuses a file whose header says otherwise.
    #[arg(long, default_value = "auto", value_name = "FORMAT", value_parser = parse_disk_format)]
    pub disk_format: Format,
    /// The sha256 the file must have (`sha256:<hex>`); the upload fails when it differs.
    #[arg(long, value_name = "sha256:HEX")]
    pub checksum: Option<String>,
}

/// `--disk-format`: `None` for auto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format(pub Option<DiskFormat>);

fn parse_disk_format(word: &str) -> Result<Format, String> {
    let format = match word.to_ascii_lowercase().as_str() {
        "auto" => None,
        "raw" => Some(DiskFormat::Raw),
        "qcow2" => Some(DiskFormat::Qcow2),
        "vmdk" => Some(DiskFormat::Vmdk),
        "vdi" => Some(DiskFormat::Vdi),
        "vhdx" => Some(DiskFormat::Vhdx),
        "iso" => Some(DiskFormat::Iso),
        "kernel" => Some(DiskFormat::Kernel),
        "ramdisk" | "initrd" => Some(DiskFormat::Ramdisk),
        _ => {
            return Err(format!(
                "`{word}` is not a disk format: use auto, raw, qcow2, vmdk, vdi, vhdx, iso, \
                 kernel or ramdisk"
            ));
        }
    };
    Ok(Format(format))
}

/// Runs `ferro image`.
pub fn run(connection: &ConnectionArgs, args: ImageArgs) -> anyhow::Result<()> {
    match args.action {
        ImageAction::Upload(args) => upload(connection, args),
    }
}

/// What an upload did.
#[derive(Debug)]
pub struct Uploaded {
    /// The Image as recorded.
    pub image: v1::Image,
    /// How many bytes were sent.
    pub bytes: u64,
    /// How long sending and storing them took.
    pub took: Duration,
}

/// Streams `file` to the apiserver as the bytes of `target`; `progress` is called with the
/// bytes sent so far as they go.
pub async fn upload_file(
    client: &ferro_api::client::Client,
    mut target: v1::UploadTarget,
    file: &std::path::Path,
    progress: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<Uploaded> {
    let mut reader =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = reader
        .metadata()
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    target.size_bytes = Some(size);
    let (chunks, receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let shown = file.display().to_string();
    let reading = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut sent = 0u64;
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < chunk.len() {
                match reader.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(anyhow!("cannot read {shown}: {e}")),
                }
            }
            if filled == 0 {
                return Ok(());
            }
            chunk.truncate(filled);
            sent += filled as u64;
            if chunks.blocking_send(chunk).is_err() {
                // The call ended (refused, or failed): its error says why.
                return Ok(());
            }
            progress(sent);
        }
    });
    let began = Instant::now();
    let result = client
        .upload_image(
            target,
            futures::stream::unfold(receiver, |mut chunks| async move {
                chunks.recv().await.map(|chunk| (chunk, chunks))
            }),
        )
        .await;
    let took = began.elapsed();
    reading.await??;
    let image = match result? {
        Object::Image(image) => image,
        other => bail!("the apiserver answered with a {}", other.kind()),
    };
    Ok(Uploaded {
        image,
        bytes: size,
        took,
    })
}

fn upload(connection: &ConnectionArgs, args: UploadArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?.clone();
    let size = std::fs::metadata(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?
        .len();
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta} left)",
            )
            .expect("a valid template"),
        );
        bar.set_message(format!("uploading {}", args.file.display()));
        Some(bar)
    } else {
        None
    };
    let shown = bar.clone();
    let target = v1::UploadTarget {
        project: connection.project.clone(),
        name: args.name.clone(),
        checksum: args.checksum.clone().unwrap_or_default(),
        disk_format: args.disk_format.0.map(|f| f as i32),
        size_bytes: None,
    };
    let result = runtime.block_on(upload_file(&client, target, &args.file, move |sent| {
        if let Some(bar) = &shown {
            bar.set_position(sent);
        }
    }));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let uploaded = result.map_err(|e| match e.downcast::<ferro_api::Error>() {
        Ok(api) => anyhow!("{}", connection.explain(&api)),
        Err(other) => other,
    })?;
    let found = uploaded
        .image
        .status
        .as_ref()
        .and_then(|s| s.uploaded.clone())
        .unwrap_or_default();
    let mib = uploaded.bytes as f64 / f64::from(1 << 20);
    println!(
        "image/{} uploaded: {mib:.1} MiB, {}, {} ({:.1} s, {:.0} MiB/s)",
        args.name,
        found.format,
        found.checksum,
        uploaded.took.as_secs_f64(),
        mib / uploaded.took.as_secs_f64().max(1e-6)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_formats_parse_and_auto_is_none() {
        assert_eq!(parse_disk_format("auto"), Ok(Format(None)));
        assert_eq!(
            parse_disk_format("QCOW2"),
            Ok(Format(Some(DiskFormat::Qcow2)))
        );
        assert_eq!(
            parse_disk_format("initrd"),
            Ok(Format(Some(DiskFormat::Ramdisk)))
        );
        assert!(
            parse_disk_format("tar")
                .unwrap_err()
                .contains("not a disk format")
        );
    }
}
