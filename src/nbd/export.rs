//! The exports of one server: images named by `--export`, found in `--dir`, or created on
//! demand in `--overlays`, and the counters the control socket reports.
//!
//! Each export holds its image behind a lock that every request takes shared for its whole
//! duration, so that a live snapshot (which swaps the image) waits for the requests in
//! flight to finish against the old image and holds later ones for the moment of the swap.
use super::handshake::{Catalog, ExportInfo};
use crate::error::{Error, Result};
use crate::format::BackingFormat;
use crate::image::{CreateOptions, Image, Layer, LayerRegistry, OpenOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The longest export name accepted: it becomes a file name (with `.cow`) in `--overlays`.
pub const MAX_EXPORT_NAME: usize = 128;

/// Checks a name a client or the operator gave before it is used as part of a path: 1 to
/// [`MAX_EXPORT_NAME`] bytes of ASCII letters, digits, `.`, `_` and `-`, not starting with
/// `.` (so no `.`, `..`, or hidden file). `/` can never appear.
pub fn validate_export_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("export name is empty".into());
    }
    if name.len() > MAX_EXPORT_NAME {
        return Err(format!(
            "export name of {} bytes is longer than the {MAX_EXPORT_NAME} allowed",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err("export name may not start with '.'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "export name contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Counters of one export, over all its connections.
#[derive(Default)]
pub(crate) struct ExportStats {
    pub clients: AtomicUsize,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

pub(crate) struct Export {
    pub name: String,
    pub description: Option<String>,
    pub read_only: bool,
    image: RwLock<Image>,
    pub stats: ExportStats,
    /// An I/O error was logged and no request has succeeded since: a full disk logs one
    /// line per episode, not one per request.
    fault_logged: AtomicBool,
    /// Taken out of the catalog: new clients cannot pick it; its connections end.
    pub removed: AtomicBool,
}

impl Export {
    pub fn new(name: String, description: Option<String>, image: Image) -> Export {
        Export {
            name,
            description,
            read_only: image.is_read_only(),
            image: RwLock::new(image),
            stats: ExportStats::default(),
            fault_logged: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    /// The image, held for one request (or a control command's look).
    pub fn image(&self) -> RwLockReadGuard<'_, Image> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The image, with every request held off (a snapshot swaps it).
    pub fn image_exclusive(&self) -> RwLockWriteGuard<'_, Image> {
        self.image.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn info(&self, name: &str) -> ExportInfo {
        ExportInfo {
            name: name.to_string(),
            size: self.image().virtual_size(),
            read_only: self.read_only,
            description: self.description.clone(),
        }
    }

    /// Logs an image error unless one was logged since the last success; the message
    /// names the OS error, the file and the offset.
    /// Going back to the durable state is always logged: it loses writes.
    pub fn note_fault(&self, error: &Error) {
        let reverted = matches!(error, Error::Reverted { .. });
        if !self.fault_logged.swap(true, Ordering::Relaxed) || reverted {
            eprintln!(
                "cowimg: {}{error} (further errors are not logged until a request succeeds)",
                self.log_prefix()
            );
        }
    }

    /// Names the export in log lines; the one export of `serve IMAGE` has no name, and its
    /// errors name the image file already.
    fn log_prefix(&self) -> String {
        if self.name.is_empty() {
            String::new()
        } else {
            format!("export \"{}\": ", self.name)
        }
    }

    /// A request that changed or flushed the image succeeded: the next fault is logged.
    pub fn note_success(&self) {
        if self.fault_logged.load(Ordering::Relaxed)
            && self.fault_logged.swap(false, Ordering::Relaxed)
        {
            eprintln!("cowimg: {}requests succeed again", self.log_prefix());
        }
    }
}

/// Where overlays made on demand live, and what they are over.
#[derive(Debug, Clone)]
pub struct OverlaySpec {
    pub dir: PathBuf,
    pub base: PathBuf,
    pub format: BackingFormat,
    /// No overlay is created once the server has this many exports: every client may make
    /// one, and each costs a file, memory and two descriptors.
    pub max_exports: usize,
    /// The format version of new overlays.
    pub version: u32,
}

/// All exports of a server.
pub(crate) struct Exports {
    by_name: RwLock<BTreeMap<String, Arc<Export>>>,
    /// The single export of `cowimg serve IMAGE` without `--export-name`: served whatever
    /// name a client asks for, as before there were many exports.
    any_name: Option<Arc<Export>>,
    /// `--dir`: files that appear there later are opened when a client asks for them.
    dir: Option<PathBuf>,
    overlays: Option<OverlaySpec>,
    pub layers: Arc<LayerRegistry>,
    /// A lock per name being opened or created on demand: two clients racing for one new
    /// name get one overlay, opened once, while different names are made in parallel
    /// (each creation waits for two fdatasyncs).
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Serializes snapshots, whose new files share temporary names (see `create_whole`).
    snapshotting: Mutex<()>,
    /// Who may use which export.
    pub access: super::Access,
    /// One page cache for every version-2 image of the server, exports and bases
    /// (`serve --cache-size`, 32 MiB by default, for all of them together).
    pub page_cache: Arc<crate::image::v2::PageCache>,
}

impl Exports {
    pub fn new(
        layers: Arc<LayerRegistry>,
        dir: Option<PathBuf>,
        overlays: Option<OverlaySpec>,
    ) -> Exports {
        Exports {
            by_name: RwLock::new(BTreeMap::new()),
            any_name: None,
            dir,
            overlays,
            layers,
            opening: Mutex::new(HashMap::new()),
            snapshotting: Mutex::new(()),
            access: super::Access::default(),
            page_cache: Arc::new(crate::image::v2::PageCache::new(
                crate::image::v2::DEFAULT_CACHE_SIZE,
            )),
        }
    }

    /// A catalog of one export served under any name.
    pub fn single(layers: Arc<LayerRegistry>, export: Export) -> Exports {
        let export = Arc::new(export);
        let mut exports = Exports::new(layers, None, None);
        exports
            .by_name
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .insert(export.name.clone(), Arc::clone(&export));
        exports.any_name = Some(export);
        exports
    }

    /// Exports may appear when clients ask for them (`--dir`, `--overlays`).
    pub fn grows(&self) -> bool {
        self.dir.is_some() || self.overlays.is_some()
    }

    pub fn open_options(&self, read_only: bool) -> OpenOptions {
        OpenOptions {
            read_only,
            layers: Some(Arc::clone(&self.layers)),
            page_cache: Some(Arc::clone(&self.page_cache)),
            ..Default::default()
        }
    }

    /// Opens `path` and adds it as `name`; refuses a name in use.
    pub fn add(
        &self,
        name: &str,
        path: &Path,
        read_only: bool,
        description: Option<String>,
    ) -> Result<Arc<Export>> {
        if self.get(name).is_some() {
            return Err(Error::Invalid {
                path: path.into(),
                reason: format!("an export named \"{name}\" exists already"),
            });
        }
        let image = open_export_image(path, None, &self.open_options(read_only))?;
        let export = Arc::new(Export::new(name.to_string(), description, image));
        match self.write_map().entry(name.to_string()) {
            // Added meanwhile by another path (the control socket, a client): the image
            // opened here closes again.
            std::collections::btree_map::Entry::Occupied(_) => Err(Error::Invalid {
                path: path.into(),
                reason: format!("an export named \"{name}\" exists already"),
            }),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Arc::clone(&export));
                Ok(export)
            }
        }
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.by_name.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned()
    }

    /// Every export, by name.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    /// Undoes [`Exports::take`] (a removal that was refused).
    pub fn put_back(&self, export: Arc<Export>) {
        export.removed.store(false, Ordering::SeqCst);
        self.write_map().insert(export.name.clone(), export);
    }

    /// Makes the export's image a read-only layer under a new overlay `new_top`, which the
    /// export writes to from then on; returns the old image's path. Requests in flight
    /// finish against the old image first, later ones wait for the swap; nobody is
    /// disconnected.
    ///
    /// Crash safety: the old image is flushed, and the new one created whole (and its
    /// directory synced), before anything changes; the swap itself touches no file. A crash
    /// at any moment leaves the old image holding every flushed write, and the new one, if
    /// it exists, an empty overlay of it.
    pub fn snapshot(&self, export: &Export, new_top: &Path) -> Result<PathBuf> {
        let invalid = |reason: String| Error::Invalid {
            path: new_top.into(),
            reason,
        };
        if export.read_only {
            return Err(invalid(format!(
                "export \"{}\" is read-only; there is nothing to snapshot",
                export.name
            )));
        }
        // Serialized with other snapshots, which may name one new file (see create_whole).
        let _one = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        let mut image = export.image_exclusive();
        image.flush()?;
        let old_top = std::fs::canonicalize(image.path()).map_err(|source| Error::File {
            path: image.path().into(),
            op: "resolving",
            source,
        })?;
        let opts = CreateOptions {
            size: Some(image.virtual_size()),
            cluster_size: image.cluster_size(),
            backing: Some((
                old_top.to_string_lossy().into_owned(),
                BackingFormat::Cowimg,
            )),
            version: image.version(),
        };
        create_whole(new_top, &opts)?;
        let top_only = OpenOptions {
            without_backing: true,
            ..self.open_options(false)
        };
        let new_image = match Image::open(new_top, &top_only) {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(new_top);
                return Err(e);
            }
        };
        // The old image stays open, as it is, and becomes the new one's backing layer:
        // nothing is reopened, so nothing can fail once the new file exists. Its write lock
        // turns shared, so that other processes may read (not change) it from now on.
        new_image.continue_reverts_of(image.reverts());
        let old = std::mem::replace(&mut *image, new_image);
        if let Err(e) = old.share_lock() {
            // Only other readers are kept out; the export is unaffected.
            eprintln!("cowimg: export \"{}\": {e}", export.name);
        }
        image.attach_shared_backing(Arc::new(Layer::Cowimg(Box::new(old))));
        Ok(old_top)
    }

    /// Takes `name` out of the catalog (its connections are the caller's to end).
    pub fn take(&self, name: &str) -> Option<Arc<Export>> {
        let export = self.write_map().remove(name)?;
        export.removed.store(true, Ordering::SeqCst);
        Some(export)
    }

    /// The export for a name a client sent: a known one, a file that appeared in `--dir`,
    /// or a new overlay in `--overlays`.
    fn find_or_open(&self, name: &str) -> std::result::Result<Arc<Export>, String> {
        if let Some(e) = self.get(name) {
            return Ok(e);
        }
        if self.dir.is_none() && self.overlays.is_none() {
            return Err(format!("no export named \"{name}\""));
        }
        validate_export_name(name).map_err(|why| format!("refused export name: {why}"))?;
        let per_name = {
            let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(opening.entry(name.to_string()).or_default())
        };
        let found = {
            let _one = per_name.lock().unwrap_or_else(|e| e.into_inner());
            self.open_or_create(name)
        };
        let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        // The last of the racers for this name takes its lock out of the table.
        if Arc::strong_count(&per_name) == 2 {
            opening.remove(name);
        }
        found
    }

    /// `find_or_open` for a name that is valid and not exported, under that name's lock.
    fn open_or_create(&self, name: &str) -> std::result::Result<Arc<Export>, String> {
        if let Some(e) = self.get(name) {
            return Ok(e);
        }
        if let Some(dir) = &self.dir {
            // As at startup: NAME.cow is exported as NAME, any other cowimg file as itself.
            for path in [dir.join(format!("{name}.cow")), dir.join(name)] {
                if is_exportable_file(&path) {
                    let read_only = !is_cowimg_file(&path);
                    return self
                        .add(name, &path, read_only, None)
                        .map_err(|e| open_failed(name, &e));
                }
            }
        }
        let Some(spec) = &self.overlays else {
            return Err(format!("no export named \"{name}\""));
        };
        let path = spec.dir.join(format!("{name}.cow"));
        // Names being made now count too, so parallel creations cannot overshoot by much.
        let count = self.by_name.read().unwrap_or_else(|e| e.into_inner()).len()
            + self.opening.lock().unwrap_or_else(|e| e.into_inner()).len()
            - 1;
        if count >= spec.max_exports {
            return Err(format!(
                "no export named \"{name}\", and the server has {count} exports, the most it makes overlays for (--max-exports)"
            ));
        }
        create_overlay(&path, spec).map_err(|e| open_failed(name, &e))?;
        let export = self
            .add(name, &path, false, None)
            .map_err(|e| open_failed(name, &e))?;
        Ok(export)
    }
}

/// The client learns that the export could not be opened; the log gets the whole error.
fn open_failed(name: &str, error: &Error) -> String {
    eprintln!("cowimg: export \"{name}\": {error}");
    format!("export \"{name}\" could not be opened")
}

/// Opens an image to export. A cowimg image is served as it is; a raw or qcow2 file only
/// read-only, through an empty overlay in memory (cowimg writes only its own format).
pub(crate) fn open_export_image(
    path: &Path,
    format: Option<BackingFormat>,
    opts: &OpenOptions,
) -> Result<Image> {
    let format = match format {
        Some(f) => f,
        None => crate::image::probe_format(path)?,
    };
    match format {
        BackingFormat::Cowimg => Image::open(path, opts),
        other if !opts.read_only => Err(Error::Invalid {
            path: path.into(),
            reason: format!(
                "is a {} image, and only a cowimg image is served writable: serve it with \
                 --read-only (or --export NAME:ro=IMAGE), or serve a cowimg overlay on it \
                 (cowimg create -b FILE -F {} overlay.cow)",
                other.name(),
                other.name()
            ),
        }),
        other => {
            let layer = crate::image::Layer::open(path, other, opts)?;
            Image::read_only_over(layer, path)
        }
    }
}

/// True for a regular file or a block device: what `--dir` exports.
pub(crate) fn is_exportable_file(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() || m.file_type().is_block_device())
}

/// True for a regular file or block device that starts with the cowimg magic.
pub(crate) fn is_cowimg_file(path: &Path) -> bool {
    matches!(crate::image::probe_format(path), Ok(BackingFormat::Cowimg))
}

/// Creates `path` as an overlay of `spec.base` unless it exists (another client made it
/// first, in this process or another).
pub(crate) fn create_overlay(path: &Path, spec: &OverlaySpec) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let base = std::fs::canonicalize(&spec.base).map_err(|e| Error::File {
        path: spec.base.clone(),
        op: "resolving",
        source: e,
    })?;
    let opts = CreateOptions {
        backing: Some((base.to_string_lossy().into_owned(), spec.format)),
        version: spec.version,
        ..Default::default()
    };
    match create_whole(path, &opts) {
        Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(())
        }
        other => other,
    }
}

/// Creates an image at `path`, which must not exist, so that it never exists half made:
/// it is made whole under a temporary name in the same directory, then hard-linked into
/// place (`link` fails if `path` exists, so of two racers one wins), and the directory is
/// synced so the name survives a crash as well as the file.
fn create_whole(path: &Path, opts: &CreateOptions) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.creating", std::process::id()));
    // Left by a crash of an earlier process with this pid: callers hold the lock of the
    // name (or of snapshots), so no one else in this process is making it.
    let _ = std::fs::remove_file(&temporary);
    Image::create(&temporary, opts)?;
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    linked.map_err(|source| Error::File {
        path: path.into(),
        op: "creating",
        source,
    })?;
    sync_parent(path)
}

/// Makes a new directory entry durable.
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::File {
            path: dir.into(),
            op: "syncing",
            source,
        })
}

impl Catalog for Exports {
    type Export = Arc<Export>;

    fn find(&self, requested: &[u8]) -> std::result::Result<(ExportInfo, Arc<Export>), String> {
        if let Some(e) = &self.any_name {
            let name = String::from_utf8_lossy(requested);
            return Ok((e.info(&name), Arc::clone(e)));
        }
        let Ok(name) = std::str::from_utf8(requested) else {
            return Err("export name is not UTF-8".into());
        };
        let export = self.find_or_open(name)?;
        Ok((export.info(&export.name), export))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .map(|e| (e.name.clone(), e.description.clone().unwrap_or_default()))
            .collect()
    }

    fn allowed(&self, name: &str) -> Option<Vec<String>> {
        // The export of `serve IMAGE` answers any name: its list is the default one.
        if self.any_name.is_some() {
            return self.access.default.clone();
        }
        self.access.allowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_that_could_escape_the_directory_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a\0b", "é", "a b"] {
            assert!(validate_export_name(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(validate_export_name(&"a".repeat(MAX_EXPORT_NAME + 1)).is_err());
        for good in ["vm1", "vm-1.disk", "A_b", &"a".repeat(MAX_EXPORT_NAME)] {
            assert!(validate_export_name(good).is_ok(), "{good:?} was refused");
        }
    }
}

#[cfg(test)]
mod lost_write_tests {
    //! Two connections to one export over socket pairs: when one client's flush fails and
    //! the image goes back to its durable state, the other client, whose acknowledged
    //! writes went with it, must not be told by its next flush that they are durable.
    use super::*;
    use crate::nbd::connection::{Memory, Params, Transmission};
    use crate::nbd::handshake::MetaContexts;
    use crate::nbd::protocol::*;
    use crate::nbd::socket::Socket;
    use crate::storage::{MemStorage, Storage};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A page cache over a disk: a failed sync loses what was not durable, and dropping the
    /// cache (`wont_need`) shows what the disk has.
    struct LosingDisk {
        cache: Mutex<MemStorage>,
        disk: Mutex<Vec<u8>>,
        fail_next_sync: AtomicBool,
    }

    impl Storage for LosingDisk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.cache.lock().unwrap().read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.cache.lock().unwrap().write_at(buf, offset)
        }
        fn sync(&self) -> std::io::Result<()> {
            if self.fail_next_sync.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            *self.disk.lock().unwrap() = self.cache.lock().unwrap().contents();
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            self.cache.lock().unwrap().len()
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.cache.lock().unwrap().punch_hole(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.cache.lock().unwrap().set_len(len)
        }
        fn wont_need(&self, _offset: u64, _len: u64) {
            let disk = self.disk.lock().unwrap().clone();
            *self.cache.lock().unwrap() = MemStorage::new(disk);
        }
    }

    struct Client(UnixStream);

    impl Client {
        /// Sends one request and returns the error of its simple reply.
        fn call(&mut self, command: u16, offset: u64, data: &[u8]) -> u32 {
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&command.to_be_bytes());
            m.extend_from_slice(&7u64.to_be_bytes());
            m.extend_from_slice(&offset.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.0.write_all(&m).unwrap();
            let mut reply = [0u8; 16];
            self.0.read_exact(&mut reply).unwrap();
            u32::from_be_bytes(reply[4..8].try_into().unwrap())
        }
    }

    #[test]
    fn a_client_whose_writes_were_lost_to_another_clients_failed_flush_gets_an_error() {
        let fresh = MemStorage::new(Vec::new());
        let opts = CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        Image::create_on(&fresh, Path::new("t.cow"), &opts).unwrap();
        let disk = Arc::new(LosingDisk {
            cache: Mutex::new(MemStorage::new(fresh.contents())),
            disk: Mutex::new(fresh.contents()),
            fail_next_sync: AtomicBool::new(false),
        });
        let storage: Arc<dyn Storage> = disk.clone();
        let image = Image::open_storage(storage, Path::new("t.cow"), false).unwrap();
        let export = Export::new("t".into(), None, image);
        let memory = Memory::new(64 << 20, 4);
        let shutting_down = AtomicBool::new(false);
        std::thread::scope(|s| {
            let mut clients = Vec::new();
            for _ in 0..2 {
                let (ours, theirs) = UnixStream::pair().unwrap();
                clients.push(Client(ours));
                let params = Params {
                    export: &export,
                    read_only: false,
                    structured: false,
                    contexts: MetaContexts::default(),
                    memory: &memory,
                    shutting_down: &shutting_down,
                    io_timeout: None,
                    idle_timeout: None,
                };
                let t =
                    Transmission::new(std::sync::Arc::new(Socket::Unix(theirs)), params).unwrap();
                s.spawn(move || t.run(2));
            }
            let (a, b) = clients.split_at_mut(1);
            let (a, b) = (&mut a[0], &mut b[0]);
            assert_eq!(
                b.call(CMD_WRITE, 0, &[2; 4096]),
                0,
                "b's write is acknowledged"
            );
            assert_eq!(a.call(CMD_WRITE, 65536, &[1; 4096]), 0);
            disk.fail_next_sync.store(true, Ordering::SeqCst);
            assert_eq!(a.call(CMD_FLUSH, 0, &[]), EIO, "a's flush failed");
            // b's write is gone with a's: its flush succeeds on the image but must not say
            // the write is durable.
            assert_eq!(
                b.call(CMD_FLUSH, 0, &[]),
                EIO,
                "b is told its write was lost"
            );
            assert_eq!(b.call(CMD_FLUSH, 0, &[]), 0, "and told once");
            assert_eq!(a.call(CMD_WRITE, 65536, &[1; 4096]), 0);
            assert_eq!(a.call(CMD_FLUSH, 0, &[]), 0, "a writes and flushes again");
            // Closing the sockets ends both connections.
            drop(clients);
        });
        let mut buf = [0u8; 4096];
        export.image().read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [1; 4096]);
    }
}
