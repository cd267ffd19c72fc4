//! Files the applications read and write.
//!
//! Inputs are opened with their length (a sealed file's layout depends on it) and
//! read in blocking code; outputs are never written in place: [`TempOutput`] writes
//! a temporary file next to the target (mode 0600) and renames it over the target
//! only when the whole operation succeeded, so a failed open or an unauthenticated
//! stream leaves no plaintext and an existing file untouched. Blocking file I/O
//! runs on tokio's blocking pool ([`run_blocking`]).

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
    /// Creates the temporary file next to `target`.
    pub(crate) fn create(target: &Path) -> Result<Self, AppError> {
        let name = target.file_name().ok_or_else(|| {
            AppError::InvalidInput(format!("{} is not a file path", target.display()))
        })?;
        let suffix: [u8; 6] = random_array()?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{suffix}.tmp"));
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
