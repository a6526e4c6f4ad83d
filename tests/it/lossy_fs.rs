//! A filesystem that loses every write not yet flushed to "disk" when the power is cut, for
//! testing durability under power loss rather than under a killed process (whose writes the
//! kernel's page cache keeps).
//!
//! It is a FUSE filesystem held entirely in memory. Each file has the data programs see and the
//! data on "disk"; `fsync` (or `fdatasync`) copies the first into the second, and
//! [`LossyDisk::cut_power`] throws away everything that was not copied. Names (create, unlink,
//! rename, mkdir) are kept as if the filesystem journaled its metadata, which is what the
//! broker's files rely on the filesystem for; only file contents can be lost. The disk outlives
//! a mount, so the test can cut the power, unmount, mount again and find what survived.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// How long the kernel may cache names and attributes: not at all, so every call reaches the
/// filesystem and a remount never sees stale attributes.
const NO_CACHE: Duration = Duration::ZERO;

/// One file or directory.
struct Node {
    parent: u64,
    is_dir: bool,
    mode: u16,
    /// What programs read: every write so far.
    data: Vec<u8>,
    /// What the disk holds: the data as of the last fsync.
    durable: Vec<u8>,
    children: BTreeMap<OsString, u64>,
}

#[derive(Default)]
struct Disk {
    nodes: BTreeMap<u64, Node>,
    next_inode: u64,
}

/// The in-memory disk behind the filesystem; survives unmounting.
#[derive(Clone)]
pub struct LossyDisk(Arc<Mutex<Disk>>);

impl LossyDisk {
    pub fn new() -> Self {
        let mut disk = Disk {
            next_inode: 2,
            ..Disk::default()
        };
        disk.nodes.insert(1, Node::new(1, true, 0o755));
        LossyDisk(Arc::new(Mutex::new(disk)))
    }

    /// Mounts the disk at `mountpoint` (an empty directory) until the session is dropped.
    /// Mounting needs `/dev/fuse` and root (or a setuid `fusermount3`).
    pub fn mount(&self, mountpoint: &Path) -> std::io::Result<BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("warrant-lossy".into()),
            MountOption::DefaultPermissions,
        ];
        fuser::spawn_mount(LossyFs(self.clone()), mountpoint, &config)
    }

    /// Every file goes back to what was on disk: unsynced writes are gone.
    pub fn cut_power(&self) {
        for node in self.lock().nodes.values_mut() {
            node.data = node.durable.clone();
        }
    }

    /// Bytes written but not synced, over all files.
    pub fn unsynced_bytes(&self) -> usize {
        self.lock()
            .nodes
            .values()
            .filter(|node| node.data != node.durable)
            .map(|node| node.data.len().max(node.durable.len()))
            .sum()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Node {
    fn new(parent: u64, is_dir: bool, mode: u16) -> Self {
        Node {
            parent,
            is_dir,
            mode,
            data: Vec::new(),
            durable: Vec::new(),
            children: BTreeMap::new(),
        }
    }

    fn attr(&self, inode: u64, request: &Request) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(inode),
            size: self.data.len() as u64,
            blocks: self.data.len().div_ceil(512) as u64,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: if self.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: self.mode,
            nlink: if self.is_dir { 2 } else { 1 },
            uid: request.uid(),
            gid: request.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Disk {
    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        let parent_node = self.nodes.get(&parent).ok_or(Errno::ENOENT)?;
        if parent_node.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.nodes.insert(inode, node);
        if let Some(parent_node) = self.nodes.get_mut(&parent) {
            parent_node.children.insert(name.to_owned(), inode);
        }
        Ok(inode)
    }
}

struct LossyFs(LossyDisk);

impl Filesystem for LossyFs {
    fn lookup(&self, request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let disk = self.0.lock();
        match disk.child(parent.0, name) {
            Some(inode) => reply.entry(
                &NO_CACHE,
                &disk.nodes[&inode].attr(inode, request),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, request: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.lock().nodes.get(&ino.0) {
            Some(node) => reply.attr(&NO_CACHE, &node.attr(ino.0, request)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        request: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut disk = self.0.lock();
        let Some(node) = disk.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            node.mode = (mode & 0o7777) as u16;
        }
        if let Some(size) = size {
            node.data.resize(size as usize, 0);
        }
        reply.attr(&NO_CACHE, &node.attr(ino.0, request));
    }

    fn mkdir(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut disk = self.0.lock();
        match disk.add(
            parent.0,
            name,
            Node::new(parent.0, true, (mode & 0o7777) as u16),
        ) {
            Ok(inode) => reply.entry(
                &NO_CACHE,
                &disk.nodes[&inode].attr(inode, request),
                Generation(0),
            ),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut disk = self.0.lock();
        match disk.add(
            parent.0,
            name,
            Node::new(parent.0, false, (mode & 0o7777) as u16),
        ) {
            Ok(inode) => reply.created(
                &NO_CACHE,
                &disk.nodes[&inode].attr(inode, request),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _request: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.0.lock().nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _request: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let disk = self.0.lock();
        let Some(node) = disk.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = (offset as usize).min(node.data.len());
        let end = (start + size as usize).min(node.data.len());
        reply.data(&node.data[start..end]);
    }

    fn write(
        &self,
        _request: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut disk = self.0.lock();
        let Some(node) = disk.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let end = offset as usize + data.len();
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[offset as usize..end].copy_from_slice(data);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _request: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _request: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.lock().nodes.get_mut(&ino.0) {
            Some(node) => {
                node.durable = node.data.clone();
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fsyncdir(
        &self,
        _request: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn unlink(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut disk = self.0.lock();
        let Some(inode) = disk.child(parent.0, name) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(parent_node) = disk.nodes.get_mut(&parent.0) {
            parent_node.children.remove(name);
        }
        disk.nodes.remove(&inode);
        reply.ok();
    }

    fn rename(
        &self,
        _request: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut disk = self.0.lock();
        let Some(inode) = disk.child(parent.0, name) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(replaced) = disk.child(new_parent.0, new_name) {
            disk.nodes.remove(&replaced);
        }
        if let Some(parent_node) = disk.nodes.get_mut(&parent.0) {
            parent_node.children.remove(name);
        }
        if let Some(new_parent_node) = disk.nodes.get_mut(&new_parent.0) {
            new_parent_node.children.insert(new_name.to_owned(), inode);
        }
        if let Some(node) = disk.nodes.get_mut(&inode) {
            node.parent = new_parent.0;
        }
        reply.ok();
    }

    fn opendir(&self, _request: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _request: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let disk = self.0.lock();
        let Some(node) = disk.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut entries = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (node.parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, child) in &node.children {
            let kind = if disk.nodes[child].is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push((*child, kind, name.clone()));
        }
        for (index, (inode, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(inode), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(
        &self,
        _request: &Request,
        _ino: INodeNo,
        _mask: fuser::AccessFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}
