//! Unit tests of reading shared directories and writing the tool's changes back.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulwark-dirs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn big_budget() -> Budget {
    Budget {
        bytes: 1 << 20,
        entries: 100,
    }
}

fn file(path: &str, bytes: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        node: Node::File(bytes.to_vec()),
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        node: Node::Dir,
    }
}

fn unchanged(path: &str) -> Entry {
    Entry {
        path: path.into(),
        node: Node::Unchanged,
    }
}

fn open(root: &Path) -> HostDir {
    HostDir::open(root).unwrap()
}

/// Opens and reads `root`, as `bulwark run` does.
fn read(root: &Path, budget: &mut Budget) -> anyhow::Result<Vec<Entry>> {
    read_tree(&HostDir::open(root)?, budget)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo only creates a file there.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on this thread with `hook` called at each stage of reading a file.
fn with_hook<T>(hook: impl FnMut(Stage, &CStr) + 'static, f: impl FnOnce() -> T) -> T {
    HOOK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    let result = f();
    HOOK.with(|h| *h.borrow_mut() = None);
    result
}

/// What is at a path, for comparing whole trees.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Dir,
    File(String, u32),
    Link(PathBuf),
    Other,
}

/// Everything under `root` (links not followed), with file contents and permissions.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let seen = if meta.file_type().is_symlink() {
                Seen::Link(std::fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                walk(root, &path, out);
                Seen::Dir
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                Seen::File(
                    String::from_utf8_lossy(&bytes).into_owned(),
                    meta.permissions().mode(),
                )
            } else {
                Seen::Other
            };
            out.insert(rel, seen);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn dir_arguments_parse() {
    assert_eq!(
        parse_dir("./data::/data"),
        Ok(DirSpec {
            host: "./data".into(),
            guest: "/data".into()
        })
    );
    assert_eq!(parse_dir("/srv/x").unwrap().guest, "/srv/x");
    assert!(parse_dir("::/x").is_err() && parse_dir("x::").is_err());
}

#[test]
fn trees_are_read_sorted_with_parents_first() {
    let root = scratch("read");
    std::fs::create_dir_all(root.join("b/c")).unwrap();
    std::fs::write(root.join("b/c/deep.txt"), b"deep").unwrap();
    std::fs::write(root.join("a.txt"), b"a").unwrap();
    std::fs::write(root.join("b/z"), b"").unwrap();
    let mut budget = big_budget();
    let host = open(&root);
    let tree = read_tree(&host, &mut budget).unwrap();
    assert_eq!(
        tree,
        vec![
            file("a.txt", b"a"),
            dir("b"),
            dir("b/c"),
            file("b/c/deep.txt", b"deep"),
            file("b/z", b""),
        ]
    );
    assert_eq!(budget.entries, 95);
    assert_eq!(budget.bytes, (1 << 20) - 5);
    // The same descriptor reads the same tree again.
    assert_eq!(read_tree(&host, &mut big_budget()).unwrap(), tree);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn links_special_files_and_oversized_trees_are_refused() {
    let root = scratch("refuse");
    std::fs::create_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("d/link")).unwrap();
    let e = read(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("symbolic link") && e.contains("d/link"), "{e}");
    std::fs::remove_file(root.join("d/link")).unwrap();

    std::fs::write(root.join("d/big"), vec![0u8; 2048]).unwrap();
    let mut small = Budget {
        bytes: 1024,
        entries: 100,
    };
    let e = read(&root, &mut small).unwrap_err().to_string();
    assert!(e.contains("--max-dir-size"), "{e}");
    let mut few = Budget {
        bytes: 1 << 20,
        entries: 1,
    };
    let e = read(&root, &mut few).unwrap_err().to_string();
    assert!(e.contains("--max-dir-files"), "{e}");

    mkfifo(&root.join("fifo"));
    let e = read(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = read(&root.join("d/big"), &mut big_budget())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_host_dir_that_is_a_link_is_refused() {
    let base = scratch("host-link");
    std::fs::create_dir(base.join("real")).unwrap();
    std::fs::write(base.join("real/f"), b"f").unwrap();
    std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
    for spelling in ["link", "link/", "link/.", "link//"] {
        let e = HostDir::open(&base.join(spelling)).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{spelling}: {e}");
    }
    assert_eq!(
        read(&base.join("real/"), &mut big_budget()).unwrap(),
        vec![file("f", b"f")]
    );
    std::fs::remove_dir_all(base).unwrap();
}

/// Defect 1: a file swapped for a FIFO between the listing and the read must be refused, not
/// opened in a way that waits for a writer forever.
#[test]
fn a_file_swapped_for_a_fifo_after_it_was_listed_is_refused_without_blocking() {
    let root = scratch("fifo-swap");
    std::fs::write(root.join("a"), b"a").unwrap();
    std::fs::write(root.join("victim"), b"v").unwrap();
    let victim = root.join("victim");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (root, victim) = (root.clone(), victim.clone());
        std::thread::spawn(move || {
            let swap = move |stage, name: &CStr| {
                if stage == Stage::Listed && name == c"victim" {
                    std::fs::remove_file(&victim).unwrap();
                    mkfifo(&victim);
                }
            };
            let result = with_hook(swap, || read(&root, &mut big_budget()));
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
    }
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            // Let the stuck reader go before failing.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&victim);
            panic!("reading the tree blocked on a FIFO swapped in after the listing");
        });
    let e = result.expect_err("a FIFO was read as a file");
    assert!(
        e.contains("not a regular file") && e.contains("victim"),
        "{e}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// Defect 1: the open-once reader refuses FIFOs, devices and links at once and reads nothing
/// from them.
#[test]
fn the_open_once_reader_refuses_fifos_devices_and_links_without_blocking() {
    let root = scratch("open-once");
    mkfifo(&root.join("fifo"));
    std::os::unix::fs::symlink("/dev/zero", root.join("link")).unwrap();
    std::fs::write(root.join("file"), b"bytes").unwrap();
    let dir = open(&root);
    let at = dir.fd.as_fd();
    let started = Instant::now();
    assert_eq!(
        read_file_at(at, c"fifo", 1 << 20).unwrap(),
        FileRead::NotRegular
    );
    assert_eq!(read_file_at(at, c"link", 1 << 20).unwrap(), FileRead::Link);
    assert_eq!(
        read_file_at(at, c"file", 1 << 20).unwrap(),
        FileRead::Bytes(b"bytes".to_vec())
    );
    assert_eq!(
        read_file_at(at, c"file", 4).unwrap(),
        FileRead::TooBig {
            size: 5,
            grew: false
        }
    );
    // The real /dev/zero and /dev/null: opened without blocking, refused without a read.
    let dev = open(Path::new("/dev"));
    for node in [c"zero", c"null", c"urandom"] {
        assert_eq!(
            read_file_at(dev.fd.as_fd(), node, 1 << 20).unwrap(),
            FileRead::NotRegular,
            "{node:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    std::fs::remove_dir_all(root).unwrap();
}

/// Defect 1: a file that grows after its size was taken is read no further than the budget.
#[test]
fn a_file_that_grows_while_it_is_read_cannot_take_more_than_the_budget() {
    let root = scratch("grows");
    let grows = root.join("grows");
    std::fs::write(&grows, vec![b'a'; 1000]).unwrap();
    let append = |path: PathBuf, bytes: usize| {
        move |stage, name: &CStr| {
            if stage == Stage::Opened && name == c"grows" {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(&vec![b'b'; bytes]).unwrap();
            }
        }
    };
    let mut budget = Budget {
        bytes: 4096,
        entries: 10,
    };
    let e = with_hook(append(grows.clone(), 1 << 20), || read(&root, &mut budget))
        .expect_err("a file read past the budget");
    let e = e.to_string();
    assert!(
        e.contains("--max-dir-size") && e.contains("at least"),
        "{e}"
    );

    // Growing within the budget is fine, and charged for what was read.
    std::fs::write(&grows, vec![b'a'; 1000]).unwrap();
    let mut budget = Budget {
        bytes: 4096,
        entries: 10,
    };
    let tree = with_hook(append(grows.clone(), 1000), || read(&root, &mut budget)).unwrap();
    let [
        Entry {
            node: Node::File(bytes),
            ..
        },
    ] = &tree[..]
    else {
        panic!("{tree:?}");
    };
    assert_eq!(bytes.len(), 2000);
    assert_eq!(budget.bytes, 4096 - 2000);
    std::fs::remove_dir_all(root).unwrap();
}

/// Reading holds no descriptor per level, so a deep tree does not run out of descriptors.
#[test]
fn a_deep_tree_is_read_without_a_descriptor_per_level() {
    let root = scratch("deep");
    let deep = (0..600).fold(root.clone(), |p, _| p.join("d"));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf"), b"leaf").unwrap();
    let open_fds = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = open_fds.clone();
    let count = move |_, name: &CStr| {
        if name == c"leaf" {
            seen.set(std::fs::read_dir("/proc/self/fd").unwrap().count());
        }
    };
    let mut budget = Budget {
        bytes: 1 << 20,
        entries: 1000,
    };
    let tree = with_hook(count, || read(&root, &mut budget)).unwrap();
    assert_eq!(tree.len(), 601);
    assert_eq!(
        tree.last(),
        Some(&file(&format!("{}leaf", "d/".repeat(600)), b"leaf"))
    );
    assert!(open_fds.get() < 300, "{} descriptors open", open_fds.get());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn changes_are_written_back_and_nothing_else_is_touched() {
    let root = scratch("write-back");
    std::fs::create_dir_all(root.join("keep/sub")).unwrap();
    std::fs::create_dir(root.join("old")).unwrap();
    std::fs::write(root.join("keep/same"), b"same").unwrap();
    std::fs::write(root.join("keep/edit"), b"before").unwrap();
    std::fs::set_permissions(
        root.join("keep/edit"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(root.join("old/x"), b"x").unwrap();
    std::fs::write(root.join("kind"), b"file that becomes a directory").unwrap();
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    // Something on the host that was not shared (created after the copy) must survive.
    std::fs::write(root.join("keep/host-only"), b"mine").unwrap();
    let same_mtime = std::fs::metadata(root.join("keep/same"))
        .unwrap()
        .modified()
        .unwrap();

    let after = vec![
        dir("keep"),
        file("keep/edit", b"after"),
        unchanged("keep/same"),
        dir("keep/sub"),
        file("keep/sub/new", b"new"),
        dir("kind"),
        file("kind/inside", b"i"),
        dir("made"),
    ];
    let changes = write_back(&host, &before, &after).unwrap();
    assert_eq!(
        changes,
        Changes {
            files_written: 3,
            dirs_created: 2,
            removed: 3,
        }
    );
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    assert_eq!(read("keep/edit"), b"after");
    assert_eq!(
        std::fs::metadata(root.join("keep/edit"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "a replaced file keeps its permissions"
    );
    assert_eq!(read("keep/same"), b"same");
    assert_eq!(
        std::fs::metadata(root.join("keep/same"))
            .unwrap()
            .modified()
            .unwrap(),
        same_mtime,
        "an unchanged file is not rewritten"
    );
    assert_eq!(read("keep/sub/new"), b"new");
    assert_eq!(read("kind/inside"), b"i");
    assert_eq!(read("keep/host-only"), b"mine");
    assert!(root.join("made").is_dir());
    assert!(!root.join("old").exists());
    let leftovers: Vec<_> = std::fs::read_dir(root.join("keep"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn hostile_answers_are_refused_before_anything_is_written() {
    let root = scratch("hostile");
    let outside = scratch("hostile-outside");
    std::fs::write(root.join("f"), b"f").unwrap();
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    for after in [
        vec![file("../escape", b"x")],
        vec![file("/etc/evil", b"x")],
        vec![file("a/b", b"x")],
        vec![file("f", b"1"), file("f", b"2")],
        vec![unchanged("never-sent")],
        vec![file("f", b"x"), file("f/g", b"y")],
        vec![file("a\0b", b"x")],
    ] {
        assert!(write_back(&host, &before, &after).is_err(), "{after:?}");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"f", "{after:?}");
    }
    // A directory swapped for a link on the host during the call is not written through.
    std::fs::create_dir(root.join("d")).unwrap();
    let before = read_tree(&host, &mut big_budget()).unwrap();
    std::fs::remove_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    let after = vec![dir("d"), file("d/planted", b"x"), unchanged("f")];
    assert!(write_back(&host, &before, &after).is_err());
    assert!(!outside.join("planted").exists());
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

/// Defect 7: HOST itself moved away and replaced by a link to another directory during the call.
#[test]
fn a_host_dir_replaced_by_a_link_during_the_call_is_not_written_through() {
    let base = scratch("host-replaced");
    let (host_path, outside) = (base.join("host"), base.join("outside"));
    std::fs::create_dir(&host_path).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(host_path.join("f"), b"f").unwrap();
    std::fs::write(outside.join("f"), b"sentinel").unwrap();
    let host = open(&host_path);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    let outside_before = snapshot(&outside);

    std::fs::rename(&host_path, base.join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &host_path).unwrap();
    let after = vec![file("f", b"changed"), file("planted", b"x")];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("no longer the directory that was shared"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    assert_eq!(std::fs::read(base.join("moved/f")).unwrap(), b"f");

    // Removed during the call: nothing is written either.
    std::fs::remove_file(&host_path).unwrap();
    std::fs::remove_dir_all(base.join("moved")).unwrap();
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("no longer the directory that was shared"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn directories_below_host_are_opened_without_following_links_with_and_without_openat2() {
    let base = scratch("beneath");
    let root = base.join("root");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir(base.join("outside")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), root.join("l")).unwrap();
    std::os::unix::fs::symlink("b", root.join("a/rel")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("a/up")).unwrap();
    let host = open(&root);
    for fallback in [false, true] {
        NO_OPENAT2.with(|f| f.set(fallback));
        let at = host.fd.as_fd();
        let fd = open_dir_beneath(at, "a/b").unwrap();
        assert!(sys::fstat(fd.as_fd()).unwrap().is_dir());
        for linked in ["l", "a/rel", "a/up", "a/up/outside", "l/x"] {
            // ELOOP for a link on the way, ENOTDIR for one at the end (O_DIRECTORY).
            let e = open_dir_beneath(at, linked).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "{fallback} {linked}: {e}"
            );
        }
        let e = open_dir_beneath(at, "a/missing").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
    NO_OPENAT2.with(|f| f.set(false));
    std::fs::remove_dir_all(base).unwrap();
}

/// Swaps the directory `real` for a link to `target` and back, over and over, on its own
/// thread, until dropped (then `real` is the directory again).
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    fn start(real: PathBuf, aside: PathBuf, target: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&real, &aside).unwrap();
                    std::os::unix::fs::symlink(&target, &real).unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                    std::fs::remove_file(&real).unwrap();
                    std::fs::rename(&aside, &real).unwrap();
                    // Long enough in place for some write-backs to get through.
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        Self {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    /// Stops swapping; how many swaps there were.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the swapper failed");
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Two states of a directory whose write-backs from one to the other create, change and remove
/// files and directories.
fn states(prefix: &str) -> (Vec<Entry>, Vec<Entry>) {
    let p = |path: &str| {
        if prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{prefix}/{path}")
        }
    };
    let mut a = Vec::new();
    let mut b = Vec::new();
    if !prefix.is_empty() {
        a.push(dir(prefix));
        b.push(dir(prefix));
    }
    a.extend([
        dir(&p("deep")),
        file(&p("deep/x"), b"state a x"),
        file(&p("edit"), b"state a"),
        file(&p("gone"), b"only in a"),
        file(&p("keep"), b"keep"),
    ]);
    b.extend([
        file(&p("edit"), b"state b"),
        file(&p("keep"), b"keep"),
        file(&p("new"), b"only in b"),
        dir(&p("newdir")),
        file(&p("newdir/y"), b"state b y"),
    ]);
    (a, b)
}

/// A directory outside HOST holding files with the names the write-backs use.
fn sentinels(outside: &Path) {
    std::fs::create_dir_all(outside.join("deep")).unwrap();
    for name in ["deep/x", "edit", "gone", "keep", "new", "sentinel"] {
        std::fs::write(outside.join(name), format!("outside: {name}")).unwrap();
    }
    std::fs::set_permissions(outside.join("edit"), std::fs::Permissions::from_mode(0o640)).unwrap();
}

/// Writes back from one state to the other and back while the swapper runs; how many of the
/// write-backs succeeded.
fn race(host: &HostDir, a: &[Entry], b: &[Entry]) -> u32 {
    let started = Instant::now();
    let (mut rounds, mut ok) = (0u32, 0u32);
    while rounds < 300 || (ok < 10 && started.elapsed() < Duration::from_secs(20)) {
        let (before, after) = if rounds % 2 == 0 { (a, b) } else { (b, a) };
        if write_back(host, before, after).is_ok() {
            ok += 1;
        }
        rounds += 1;
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    eprintln!("{rounds} write-backs, {ok} complete");
    ok
}

/// Defect 7: a subdirectory of HOST swapped for a link to a directory outside, and back, while
/// write-backs run: nothing outside is created, changed or removed (with `openat2` and with the
/// component-by-component fallback).
#[test]
fn racing_swaps_of_a_subdirectory_never_lead_the_write_back_outside() {
    for fallback in [false, true] {
        let base = scratch(&format!("race-sub-{fallback}"));
        let (root, outside) = (base.join("host"), base.join("outside"));
        sentinels(&outside);
        let (a, b) = states("sub");
        std::fs::create_dir(&root).unwrap();
        materialize(&root, &a).unwrap();
        let outside_before = snapshot(&outside);
        let host = open(&root);
        NO_OPENAT2.with(|f| f.set(fallback));
        let swapper = Swapper::start(root.join("sub"), root.join(".sub-aside"), outside.clone());
        let ok = race(&host, &a, &b);
        let swaps = swapper.stop();
        NO_OPENAT2.with(|f| f.set(false));
        assert_eq!(
            snapshot(&outside),
            outside_before,
            "a write-back reached outside HOST (fallback: {fallback})"
        );
        let names: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(swaps > 0 && ok > 0, "swaps {swaps}, write-backs {ok}");
        std::fs::remove_dir_all(base).unwrap();
    }
}

/// Defect 7: HOST itself swapped (through its parent) for a link to a directory outside, and
/// back, while write-backs run: nothing outside is created, changed or removed.
#[test]
fn racing_swaps_of_the_host_dir_never_lead_the_write_back_outside() {
    let base = scratch("race-host");
    let (root, outside) = (base.join("host"), base.join("outside"));
    sentinels(&outside);
    let (a, b) = states("");
    std::fs::create_dir(&root).unwrap();
    materialize(&root, &a).unwrap();
    let outside_before = snapshot(&outside);
    let host = open(&root);
    let swapper = Swapper::start(root.clone(), base.join("host-aside"), outside.clone());
    let ok = race(&host, &a, &b);
    let swaps = swapper.stop();
    assert_eq!(
        snapshot(&outside),
        outside_before,
        "a write-back reached outside HOST"
    );
    let names: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(swaps > 0 && ok > 0, "swaps {swaps}, write-backs {ok}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn materialized_trees_read_back_identically() {
    let root = scratch("materialize");
    let tree = vec![dir("a"), file("a/b", b"bytes"), file("c", b"")];
    materialize(&root, &tree).unwrap();
    assert_eq!(read(&root, &mut big_budget()).unwrap(), tree);
    assert!(materialize(&root, &[file("../x", b"")]).is_err());
    std::fs::remove_dir_all(root).unwrap();
}
