//! `qkdnet crypto …`: SM3 digests and SM4 encryption of files.
//!
//! These commands exist for interoperability checks against other SM3/SM4 tools
//! (OpenSSL's `dgst -sm3` and `enc -sm4-ctr`, RFC 8998 SM4-GCM peers), so their
//! formats are the plain ones those tools use: `HEX  FILE` digests like coreutils,
//! raw CTR output, and GCM as `ciphertext || 16-byte tag`. Everything streams in
//! constant memory. Output goes to a temporary file beside `--out` that is renamed
//! into place only when the whole operation succeeded, so a failed GCM tag check
//! (or any I/O error) leaves no plaintext behind and never clobbers an existing file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use qkdnet_crypto::gcm::{GCM_NONCE_LEN, GCM_TAG_LEN, GcmTag, Sm4GcmDecryptor, Sm4GcmEncryptor};
use qkdnet_crypto::sm3::Sm3Hasher;
use qkdnet_crypto::sm4::{SM4_BLOCK_LEN, SM4_KEY_LEN, Sm4Ctr};
use qkdnet_crypto::{SecretBytes, Sm4Key};

/// Read/write chunk size: large enough to amortise syscalls, small enough to stay in cache.
const CHUNK: usize = 64 * 1024;

/// Crypto subcommands.
#[derive(Debug, Subcommand)]
pub enum CryptoCommand {
    /// Print the SM3 digest of each FILE as `HEX  FILE` (like sha256sum).
    ///
    /// Example: qkdnet crypto sm3 Cargo.toml
    Sm3 {
        /// Files to hash.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Encrypt or decrypt a file with SM4 in CTR or GCM mode (RFC 8998 SM4-GCM).
    ///
    /// CTR: 16-byte IV, the full 128-bit IV is the big-endian counter (same as
    /// `openssl enc -sm4-ctr -K KEY -iv IV`). GCM: 12-byte IV (nonce); the output of
    /// encryption is ciphertext followed by the 16-byte tag; decryption checks the tag
    /// and writes nothing if it fails. Never reuse a key/IV pair. The key is given on
    /// the command line for testing convenience: other local users may see it in the
    /// process list.
    ///
    /// Example: qkdnet crypto sm4 --mode gcm --key 0123456789abcdeffedcba9876543210
    /// --iv 00001234567800000000abcd --in plain.bin --out sealed.bin
    Sm4 {
        /// Mode of operation.
        #[arg(long, value_enum)]
        mode: Sm4Mode,
        /// Key, 32 hex digits (16 bytes).
        #[arg(long, value_name = "HEX")]
        key: String,
        /// IV: 32 hex digits for CTR, 24 for GCM.
        #[arg(long, value_name = "HEX")]
        iv: String,
        /// Additional authenticated data, hex (GCM only).
        #[arg(long, value_name = "HEX")]
        aad: Option<String>,
        /// Decrypt instead of encrypt.
        #[arg(long)]
        decrypt: bool,
        /// Input file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Output file (written atomically; must differ from the input).
        #[arg(long = "out", value_name = "FILE")]
        output: PathBuf,
    },
}

/// SM4 modes offered by the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sm4Mode {
    /// Counter mode, 128-bit big-endian counter (no authentication).
    Ctr,
    /// Galois/counter mode, 12-byte nonce, 16-byte tag (RFC 8998).
    Gcm,
}

/// Runs a crypto subcommand.
pub fn run(c: CryptoCommand) -> anyhow::Result<()> {
    match c {
        CryptoCommand::Sm3 { files } => {
            let stdout = io::stdout();
            let mut out = stdout.lock();
            for f in files {
                let digest = sm3_file(&f)?;
                writeln!(out, "{}  {}", hex::encode(digest), f.display())?;
            }
            Ok(())
        }
        CryptoCommand::Sm4 {
            mode,
            key,
            iv,
            aad,
            decrypt,
            input,
            output,
        } => {
            let key = parse_key(&key)?;
            let iv = parse_hex("--iv", &iv)?;
            let aad = match (&aad, mode) {
                (Some(_), Sm4Mode::Ctr) => bail!("--aad is only meaningful with --mode gcm"),
                (Some(a), Sm4Mode::Gcm) => parse_hex("--aad", a)?,
                (None, _) => Vec::new(),
            };
            if same_file(&input, &output) {
                bail!("--in and --out must be different files");
            }
            let src = File::open(&input).with_context(|| format!("opening {}", input.display()))?;
            write_atomically(&output, |dst| match (mode, decrypt) {
                (Sm4Mode::Ctr, _) => ctr_stream(&key, &iv, src, dst),
                (Sm4Mode::Gcm, false) => gcm_seal_stream(&key, &iv, &aad, src, dst),
                (Sm4Mode::Gcm, true) => gcm_open_stream(&key, &iv, &aad, src, dst),
            })
        }
    }
}

fn sm3_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sm3Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_retrying(&mut f, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

fn parse_hex(flag: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(s.trim()).map_err(|e| anyhow::anyhow!("{flag}: not valid hex ({e})"))
}

fn parse_key(s: &str) -> anyhow::Result<Sm4Key> {
    // Decoded straight into a zeroizing buffer; the error never echoes the key.
    let bytes = SecretBytes::new(
        hex::decode(s.trim()).map_err(|_| anyhow::anyhow!("--key: not valid hex"))?,
    );
    if bytes.len() != SM4_KEY_LEN {
        bail!(
            "--key must be {SM4_KEY_LEN} bytes ({} hex digits), got {} bytes",
            2 * SM4_KEY_LEN,
            bytes.len()
        );
    }
    Ok(Sm4Key::try_from(&bytes)?)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `read` that retries on EINTR.
fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Fills `buf` completely unless EOF comes first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = read_retrying(r, &mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Runs `body` writing to a fresh temporary file next to `out`, then renames it to
/// `out`. On any error the temporary file is removed and `out` is untouched.
fn write_atomically(
    out: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("--out {} is not a file name", out.display()))?;
    let tmp = dir.join(format!(
        ".{}.qkdnet-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("creating temporary file {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(CHUNK, file);
    let result = body(&mut w).and_then(|()| {
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn ctr_stream(key: &Sm4Key, iv: &[u8], mut src: File, dst: &mut impl Write) -> anyhow::Result<()> {
    if iv.len() != SM4_BLOCK_LEN {
        bail!(
            "--iv must be {SM4_BLOCK_LEN} bytes ({} hex digits) for CTR, got {} bytes",
            2 * SM4_BLOCK_LEN,
            iv.len()
        );
    }
    let mut ctr = Sm4Ctr::from_slices(key.expose_secret(), iv)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_retrying(&mut src, &mut buf).context("reading input")?;
        if n == 0 {
            return Ok(());
        }
        ctr.apply_keystream(&mut buf[..n])?;
        dst.write_all(&buf[..n]).context("writing output")?;
    }
}

fn gcm_nonce(iv: &[u8]) -> anyhow::Result<[u8; GCM_NONCE_LEN]> {
    iv.try_into().map_err(|_| {
        anyhow::anyhow!(
            "--iv must be {GCM_NONCE_LEN} bytes ({} hex digits) for GCM, got {} bytes",
            2 * GCM_NONCE_LEN,
            iv.len()
        )
    })
}

fn gcm_seal_stream(
    key: &Sm4Key,
    iv: &[u8],
    aad: &[u8],
    mut src: File,
    dst: &mut impl Write,
) -> anyhow::Result<()> {
    let mut enc = Sm4GcmEncryptor::new(key, &gcm_nonce(iv)?, aad)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_retrying(&mut src, &mut buf).context("reading input")?;
        if n == 0 {
            break;
        }
        enc.update(&mut buf[..n])?;
        dst.write_all(&buf[..n]).context("writing output")?;
    }
    dst.write_all(&enc.finish()).context("writing output")?;
    Ok(())
}

fn gcm_open_stream(
    key: &Sm4Key,
    iv: &[u8],
    aad: &[u8],
    mut src: File,
    dst: &mut impl Write,
) -> anyhow::Result<()> {
    let mut dec = Sm4GcmDecryptor::new(key, &gcm_nonce(iv)?, aad)?;
    // The tag is the last 16 bytes; we do not know where the input ends until we hit
    // EOF, so keep the most recent 16 bytes back from the decryptor at all times.
    let mut buf = vec![0u8; CHUNK + GCM_TAG_LEN];
    let mut held = read_full(&mut src, &mut buf[..GCM_TAG_LEN]).context("reading input")?;
    if held < GCM_TAG_LEN {
        bail!("input is {held} bytes, too short to hold a {GCM_TAG_LEN}-byte GCM tag");
    }
    loop {
        let n = read_retrying(&mut src, &mut buf[held..]).context("reading input")?;
        if n == 0 {
            break;
        }
        held += n;
        let ready = held - GCM_TAG_LEN;
        dec.update(&mut buf[..ready])?;
        dst.write_all(&buf[..ready]).context("writing output")?;
        buf.copy_within(ready..held, 0);
        held = GCM_TAG_LEN;
    }
    let tag: GcmTag = buf[..GCM_TAG_LEN]
        .try_into()
        .expect("invariant: exactly GCM_TAG_LEN bytes are held at EOF");
    dec.finish(&tag)
        .context("GCM authentication failed: wrong key, IV or AAD, or the input was modified; no output written")
}
