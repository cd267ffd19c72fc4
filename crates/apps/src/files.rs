//! Files the applications read and write.
//!
//! Inputs are opened with their length (a sealed file's layout depends on it) and
//! read in blocking code; outputs are never written in place: [`TempOutput`] writes
//! a temporary file next to the target (mode 0600) and renames it over the target
//! only when the whole operation succeeded, so a failed open or an unauthenticated
//! stream leaves no plaintext and an existing file untouched. Blocking file I/O
//! runs on tokio's blocking pool ([`run_blocking`]).
//!
//! A process killed outright (SIGKILL, power loss) runs no destructor, so its
//! temporary file stays behind. The temporary outputs of `msg open`
//! ([`TempOutput::create_for_open`]) therefore carry a recognisable name,
//! `.NAME.qkdnet-open-PID-RANDOM.tmp`, and [`remove_stale_open_outputs`] deletes
//! those whose process is gone (Linux: no `/proc/PID`) at the start of the next
//! open into the same directory. What such a file can hold is limited by
//! [`crate::seal`]'s two passes: only plaintext of a file whose every chunk was
//! already authenticated.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::AppError;
use crate::keys::random_array;

/// Opens a regular file for reading, with its length.
pub(crate) fn open_input(path: &Path) -> Result<(BufReader<File>, u64), AppError> {
    let what = || format!("cannot read {}", path.display());
    let f = File::open(path).map_err(|e| AppError::io(what(), e))?;
    let meta = f.metadata().map_err(|e| AppError::io(what(), e))?;
    if !meta.is_file() {
        return Err(AppError::InvalidInput(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok((BufReader::with_capacity(64 << 10, f), meta.len()))
}

/// Fills `buf`; running out of input is an integrity error worded by `on_eof`.
pub(crate) fn read_exactly(
    r: &mut impl Read,
    buf: &mut [u8],
    on_eof: impl FnOnce() -> String,
) -> Result<(), AppError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            AppError::Integrity(on_eof())
        } else {
            AppError::io("read", e)
        }
    })
}

/// One `read`, retried on `Interrupted`; 0 means end of input.
pub(crate) fn read_some(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<usize, AppError> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(AppError::io(what, e)),
        }
    }
}

/// Runs blocking code (file I/O, bulk crypto) on tokio's blocking pool.
pub(crate) async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AppError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError::Internal(format!("worker task: {e}")))?
}

/// An output being written: a temporary file next to the target, renamed over it
/// by [`TempOutput::commit`] and deleted if dropped before.
pub(crate) struct TempOutput {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<BufWriter<File>>,
}

impl TempOutput {
    /// Creates the temporary file `.NAME.RANDOM.tmp` next to `target`.
    pub(crate) fn create(target: &Path) -> Result<Self, AppError> {
        Self::create_named(target, "")
    }

    /// Creates the temporary file `.NAME.qkdnet-open-PID-RANDOM.tmp` next to
    /// `target`, which [`remove_stale_open_outputs`] recognises once this process
    /// is gone.
    pub(crate) fn create_for_open(target: &Path) -> Result<Self, AppError> {
        Self::create_named(target, &format!("{OPEN_TMP_MARK}{}-", std::process::id()))
    }

    fn create_named(target: &Path, tag: &str) -> Result<Self, AppError> {
        let name = target.file_name().ok_or_else(|| {
            AppError::InvalidInput(format!("{} is not a file path", target.display()))
        })?;
        let suffix: [u8; 6] = random_array()?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{tag}{suffix}.tmp"));
        let tmp = target.with_file_name(tmp_name);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let f = o.open(&tmp).map_err(|e| {
            AppError::io(
                format!("cannot create a file next to {}", target.display()),
                e,
            )
        })?;
        Ok(Self {
            tmp,
            target: target.to_owned(),
            file: Some(BufWriter::with_capacity(64 << 10, f)),
        })
    }

    /// Appends to the temporary file.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), AppError> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| AppError::Internal("write after commit".into()))?;
        f.write_all(data)
            .map_err(|e| AppError::io(format!("writing {}", self.tmp.display()), e))
    }

    /// Flushes, syncs and renames the temporary file over the target.
    pub(crate) fn commit(mut self) -> Result<(), AppError> {
        let what = || format!("writing {}", self.target.display());
        let f = self
            .file
            .take()
            .ok_or_else(|| AppError::Internal("commit twice".into()))?;
        let f = f
            .into_inner()
            .map_err(|e| AppError::io(what(), e.into_error()))?;
        f.sync_all().map_err(|e| AppError::io(what(), e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| AppError::io(what(), e))?;
        self.tmp = PathBuf::new(); // nothing left to delete
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        self.file = None;
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// What marks a temporary output of `msg open` in its name (see the module docs).
const OPEN_TMP_MARK: &str = "qkdnet-open-";

/// The process ID in the name of a temporary output of `msg open`
/// (`.NAME.qkdnet-open-PID-RANDOM.tmp`), if `name` is one.
fn open_tmp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = rest.rsplit_once(OPEN_TMP_MARK)?;
    let (pid, random) = tail.split_once('-')?;
    if random.len() != 12 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be running. Only Linux can tell (`/proc`);
/// elsewhere, or without procfs, every process counts as running, so nothing is
/// deleted.
fn process_may_run(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if !cfg!(target_os = "linux") || !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Deletes the temporary outputs of `msg open` in `dir` left by processes that
/// no longer run (killed before they could clean up). Returns the paths deleted;
/// a file that cannot be deleted is reported in the error list, not fatal.
pub(crate) fn remove_stale_open_outputs(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (mut removed, mut problems) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (removed, problems); // the output's directory is checked by TempOutput
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(open_tmp_pid) else {
            continue;
        };
        if process_may_run(pid) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = e.path();
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(err) => problems.push(format!(
                "cannot delete the stale temporary output {}: {err}",
                path.display()
            )),
        }
    }
    (removed, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_temporary_names_are_recognised() {
        assert_eq!(
            open_tmp_pid(".report.pdf.qkdnet-open-1234-0123456789ab.tmp"),
            Some(1234)
        );
        // A target whose own name contains the mark.
        assert_eq!(
            open_tmp_pid(".a.qkdnet-open-1.qkdnet-open-77-0123456789ab.tmp"),
            Some(77)
        );
        for other in [
            "report.pdf.qkdnet-open-1234-0123456789ab.tmp",
            ".report.pdf.0123456789ab.tmp",
            ".report.pdf.qkdnet-open-x-0123456789ab.tmp",
            ".report.pdf.qkdnet-open-12-0123.tmp",
            ".report.pdf.qkdnet-open-12-0123456789zz.tmp",
        ] {
            assert_eq!(open_tmp_pid(other), None, "{other}");
        }
    }

    #[test]
    fn only_outputs_of_gone_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("qkdnet-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mine = TempOutput::create_for_open(&dir.join("out")).expect("temp");
        // PIDs above the kernel's limit (4 194 304) never run.
        let stale = dir.join(".out.qkdnet-open-4294967295-0123456789ab.tmp");
        std::fs::write(&stale, b"x").expect("write");
        let other = dir.join(".out.0123456789ab.tmp");
        std::fs::write(&other, b"x").expect("write");
        let (removed, problems) = remove_stale_open_outputs(&dir);
        assert!(problems.is_empty(), "{problems:?}");
        if cfg!(target_os = "linux") {
            assert_eq!(removed, vec![stale.clone()]);
            assert!(!stale.exists());
        }
        assert!(mine.tmp.exists(), "a running process's output stays");
        assert!(other.exists(), "other temporary files stay");
        drop(mine);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
