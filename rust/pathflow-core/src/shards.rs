//! WebDataset shard writer: plain tar files any tar tool, `webdataset` or DALI can read.
//!
//! * Shards are `<dir>/<prefix>-%06d.tar`, rolled over by a maximum number of samples and a
//!   maximum size in bytes (a shard always holds at least one sample).
//! * A sample is a set of files `<key>.<ext>` written consecutively; keys contain no dots
//!   (use [`sanitize_key`]), so `webdataset` and DALI split `<key>.<ext>` correctly.
//! * Each shard gets a DALI index `<prefix>-%06d.idx` (`v1.2 <samples>` then one line per
//!   sample: `ext offset size name` for each file, offsets of the file data in the tar), the
//!   format `fn.readers.webdataset(index_paths=...)` and `tools/wds2idx.py` use.
//! * Crash safety: a shard is written to a hidden temporary (`.<name>.tar.tmp`), fsynced, its
//!   index is renamed into place first, then the tar. A `.tar` under its final name is
//!   therefore always complete and indexed; anything else is left-over and can be deleted.
//! * Output is deterministic: tar headers carry no time, user or host information, so the
//!   same samples give byte-identical shards.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{invalid, Result};

/// Settings of a [`ShardWriter`].
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Output folder (created if missing).
    pub dir: PathBuf,
    /// Shard name prefix: shards are `<prefix>-%06d.tar`.
    pub prefix: String,
    /// Maximum samples per shard (>= 1).
    pub max_count: usize,
    /// Maximum tar size in bytes; a sample that would cross it starts a new shard.
    pub max_bytes: u64,
    /// Number of the first shard to write (to resume after finished shards).
    pub start_index: usize,
    /// Global index of the first sample written (recorded in [`ShardInfo::first_sample`]).
    pub start_sample: u64,
}

/// A finished shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard number.
    pub index: usize,
    /// File name of the tar (`<prefix>-%06d.tar`).
    pub name: String,
    /// Samples in the shard.
    pub count: usize,
    /// Size of the tar in bytes.
    pub bytes: u64,
    /// Global index of its first sample.
    pub first_sample: u64,
}

/// Shard file name for a prefix and shard number.
pub fn shard_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:06}.tar")
}

/// Maps an identifier to a WebDataset key: `.` and characters outside `[A-Za-z0-9_-]` become
/// `_`, and keys longer than `max_len` are cut and suffixed with a stable 64-bit FNV-1a hash
/// of the original, so distinct ids stay distinct.
pub fn sanitize_key(id: &str, max_len: usize) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let changed = clean != id;
    if clean.len() <= max_len && !changed {
        return clean;
    }
    // Any change gets a hash suffix, so "a.b" and "a_b" cannot collide.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let suffix = format!("-{:016x}", h);
    let keep = max_len.saturating_sub(suffix.len()).min(clean.len());
    format!("{}{}", &clean[..keep], suffix)
}

/// Counts bytes written through it.
struct Counting<W: Write> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct OpenShard {
    index: usize,
    tmp: PathBuf,
    builder: tar::Builder<Counting<BufWriter<File>>>,
    idx: Vec<String>,
    first_sample: u64,
}

/// Writes samples into rolling WebDataset shards (see the module docs).
pub struct ShardWriter {
    cfg: ShardConfig,
    current: Option<OpenShard>,
    next_index: usize,
    next_sample: u64,
    done: Vec<ShardInfo>,
}

const BLOCK: u64 = 512;

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn valid_ext(ext: &str) -> bool {
    !ext.is_empty()
        && !ext.starts_with('.')
        && ext
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

impl ShardWriter {
    /// Creates the output folder and a writer; nothing is written before the first sample.
    pub fn new(cfg: ShardConfig) -> Result<Self> {
        if cfg.max_count == 0 {
            return Err(invalid("max samples per shard must be >= 1"));
        }
        if cfg.prefix.is_empty() || cfg.prefix.contains(['/', '.']) {
            return Err(invalid(format!("invalid shard prefix {:?}", cfg.prefix)));
        }
        fs::create_dir_all(&cfg.dir)?;
        let (next_index, next_sample) = (cfg.start_index, cfg.start_sample);
        Ok(Self {
            cfg,
            current: None,
            next_index,
            next_sample,
            done: Vec::new(),
        })
    }

    /// Global index the next sample will get.
    pub fn next_sample(&self) -> u64 {
        self.next_sample
    }

    /// Shards finished so far (the current one is not included).
    pub fn finished(&self) -> &[ShardInfo] {
        &self.done
    }

    fn open(&mut self) -> Result<()> {
        let name = shard_name(&self.cfg.prefix, self.next_index);
        let tmp = self.cfg.dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp)?;
        let w = Counting {
            inner: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
        };
        let mut builder = tar::Builder::new(w);
        builder.mode(tar::HeaderMode::Deterministic);
        self.current = Some(OpenShard {
            index: self.next_index,
            tmp,
            builder,
            idx: Vec::new(),
            first_sample: self.next_sample,
        });
        self.next_index += 1;
        Ok(())
    }

    /// Appends one sample: `files` are `(extension, bytes)` pairs written as `<key>.<ext>`.
    pub fn add(&mut self, key: &str, files: &[(&str, &[u8])]) -> Result<()> {
        if key.is_empty() || key.contains(['.', '/']) || key.len() > 90 {
            return Err(invalid(format!(
                "invalid sample key {key:?} (no dots or slashes, at most 90 characters)"
            )));
        }
        if files.is_empty() {
            return Err(invalid(format!("sample {key:?} has no files")));
        }
        if let Some((ext, _)) = files.iter().find(|(e, _)| !valid_ext(e)) {
            return Err(invalid(format!(
                "invalid extension {ext:?} for sample {key:?}"
            )));
        }
        let size: u64 = files
            .iter()
            .map(|(_, d)| BLOCK + padded(d.len() as u64))
            .sum();
        let roll = match &self.current {
            None => true,
            Some(cur) => {
                let count = cur.idx.len();
                let pos = cur.builder.get_ref().pos;
                count >= self.cfg.max_count
                    || (count > 0 && pos + size + 2 * BLOCK > self.cfg.max_bytes)
            }
        };
        if roll {
            self.close_current()?;
            self.open()?;
        }
        let cur = self.current.as_mut().expect("shard is open");
        let mut line = Vec::with_capacity(files.len());
        for (ext, data) in files {
            let name = format!("{key}.{ext}");
            let mut header = tar::Header::new_ustar();
            header.set_path(&name)?;
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            let offset = cur.builder.get_ref().pos + BLOCK;
            cur.builder.append(&header, *data)?;
            line.push(format!("{ext} {offset} {} {name}", data.len()));
        }
        cur.idx.push(line.join(" "));
        self.next_sample += 1;
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let tmp = cur.tmp.clone();
        let name = shard_name(&self.cfg.prefix, cur.index);
        let idx_tmp = self
            .cfg
            .dir
            .join(format!(".{}.tmp", name.replace(".tar", ".idx")));
        match self.publish(cur) {
            Ok(info) => {
                self.done.push(info);
                Ok(())
            }
            Err(e) => {
                // Never leave a half-written shard or index behind.
                let _ = fs::remove_file(&tmp);
                let _ = fs::remove_file(&idx_tmp);
                Err(e)
            }
        }
    }

    fn publish(&self, cur: OpenShard) -> Result<ShardInfo> {
        let OpenShard {
            index,
            tmp,
            builder,
            idx,
            first_sample,
        } = cur;
        let mut w = builder.into_inner()?; // writes the two end-of-archive blocks
        w.flush()?;
        let bytes = w.pos;
        let file = w.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let name = shard_name(&self.cfg.prefix, index);
        let final_tar = self.cfg.dir.join(&name);
        let idx_name = name.replace(".tar", ".idx");
        let idx_tmp = self.cfg.dir.join(format!(".{idx_name}.tmp"));
        let mut text = format!("v1.2 {}\n", idx.len());
        for l in &idx {
            text.push_str(l);
            text.push('\n');
        }
        write_synced(&idx_tmp, text.as_bytes())?;
        fs::rename(&idx_tmp, self.cfg.dir.join(&idx_name))?;
        fs::rename(&tmp, &final_tar)?;
        sync_dir(&self.cfg.dir);
        Ok(ShardInfo {
            index,
            name,
            count: idx.len(),
            bytes,
            first_sample,
        })
    }

    /// Closes the open shard and returns every shard this writer finished.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.close_current()?;
        Ok(std::mem::take(&mut self.done))
    }

    /// Drops the open shard without publishing it (its temporary file is removed).
    pub fn abort(mut self) {
        if let Some(cur) = self.current.take() {
            let tmp = cur.tmp.clone();
            drop(cur);
            let _ = fs::remove_file(tmp);
        }
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An unfinished shard is never published: remove its temporary file.
        if let Some(cur) = self.current.take() {
            let tmp = cur.tmp.clone();
            drop(cur);
            let _ = fs::remove_file(tmp);
        }
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pathflow-shards-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn cfg(dir: &Path, max_count: usize, max_bytes: u64) -> ShardConfig {
        ShardConfig {
            dir: dir.to_path_buf(),
            prefix: "train".into(),
            max_count,
            max_bytes,
            start_index: 0,
            start_sample: 0,
        }
    }

    #[test]
    fn rolls_by_count_and_indexes_offsets() {
        let dir = tmpdir("count");
        let mut w = ShardWriter::new(cfg(&dir, 2, 1 << 30)).unwrap();
        for i in 0..5 {
            let key = format!("s{i}");
            let img = vec![i as u8; 700 + i];
            w.add(&key, &[("jpg", &img), ("json", b"{}")]).unwrap();
        }
        let shards = w.finish().unwrap();
        assert_eq!(
            shards.iter().map(|s| s.count).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        assert_eq!(shards[1].first_sample, 2);
        assert_eq!(shards[0].name, "train-000000.tar");
        // Index offsets point at the file data inside the tar.
        let tar_bytes = fs::read(dir.join("train-000001.tar")).unwrap();
        let idx = fs::read_to_string(dir.join("train-000001.idx")).unwrap();
        let mut lines = idx.lines();
        assert_eq!(lines.next(), Some("v1.2 2"));
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(first[0], "jpg");
        let (off, size): (usize, usize) = (first[1].parse().unwrap(), first[2].parse().unwrap());
        assert_eq!(first[3], "s2.jpg");
        assert_eq!(size, 702);
        assert!(tar_bytes[off..off + size].iter().all(|&b| b == 2));
        // The tar crate reads it back with the same names in order.
        let mut ar = tar::Archive::new(&tar_bytes[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["s2.jpg", "s2.json", "s3.jpg", "s3.json"]);
        assert_eq!(tar_bytes.len() as u64, shards[1].bytes);
        // No temporaries left.
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rolls_by_bytes_and_is_deterministic() {
        let dir = tmpdir("bytes");
        let run = |d: &Path| {
            let mut w = ShardWriter::new(cfg(d, 1000, 4096)).unwrap();
            for i in 0..6 {
                w.add(&format!("k{i}"), &[("jpg", &vec![7u8; 1000])])
                    .unwrap();
            }
            w.finish().unwrap()
        };
        let a = run(&dir.join("a"));
        let b = run(&dir.join("b"));
        // 512 header + 1024 data per sample + 1024 end blocks: 2 samples fit in 4096.
        assert_eq!(a.iter().map(|s| s.count).collect::<Vec<_>>(), vec![2, 2, 2]);
        assert!(a.iter().all(|s| s.bytes <= 4096));
        for s in &a {
            let x = fs::read(dir.join("a").join(&s.name)).unwrap();
            let y = fs::read(dir.join("b").join(&s.name)).unwrap();
            assert_eq!(x, y);
        }
        assert_eq!(a, b);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unfinished_shard_is_never_published() {
        let dir = tmpdir("abort");
        {
            let mut w = ShardWriter::new(cfg(&dir, 10, 1 << 30)).unwrap();
            w.add("a", &[("jpg", b"xyz")]).unwrap();
            // dropped without finish(), as in a crash that unwinds
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn resumes_numbering() {
        let dir = tmpdir("resume");
        let mut c = cfg(&dir, 10, 1 << 30);
        c.start_index = 7;
        c.start_sample = 70;
        let mut w = ShardWriter::new(c).unwrap();
        w.add("a", &[("jpg", b"x")]).unwrap();
        let s = w.finish().unwrap();
        assert_eq!(s[0].name, "train-000007.tar");
        assert_eq!(s[0].first_sample, 70);
        let mut f = File::open(dir.join("train-000007.idx")).unwrap();
        let mut t = String::new();
        f.read_to_string(&mut t).unwrap();
        assert!(t.starts_with("v1.2 1\njpg 512 1 a.jpg"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_are_dot_free_and_distinct() {
        assert_eq!(sanitize_key("slide_12_34", 90), "slide_12_34");
        let a = sanitize_key("TCGA-A1.B2", 90);
        let b = sanitize_key("TCGA-A1_B2", 90);
        assert!(!a.contains('.'));
        assert_ne!(a, b);
        let long = "x".repeat(200);
        assert_eq!(sanitize_key(&long, 60).len(), 60);
        let mut w = ShardWriter::new(cfg(&tmpdir("keys"), 1, 1 << 20)).unwrap();
        assert!(w.add("a.b", &[("jpg", b"x")]).is_err());
        assert!(w.add("ab", &[(".jpg", b"x")]).is_err());
    }
}
