//! A WASI test tool for `bulwark run --dir`: works on the directory given as its first argument
//! with `std::fs` and prints one line per step, errors included, so the same transcript is
//! expected from every WASI implementation.
//!
//! `fs-tool DIR work` expects DIR to hold `in.txt` ("0123456789"), `log.txt`, `rename-me.txt`,
//! `delete-me.txt` and `old-dir/` with files; it reads, writes, renames, removes, appends,
//! seeks, truncates, lists, and tries things that must fail (a missing file, an existing
//! directory, a non-empty directory, a path above DIR). `fs-tool DIR write-then-exit N` writes
//! `out.txt` then exits with code N; `write-then-trap` writes then traps; `write-then-spin`
//! writes then loops forever. `fs-tool DIR fill MIB` writes MIB MiB to `big.bin` in 64 KiB
//! pieces and reports where it stopped.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

fn show<T: std::fmt::Debug>(step: &str, r: std::io::Result<T>) {
    match r {
        Ok(v) => println!("{step}: ok {v:?}"),
        Err(e) => println!("{step}: error {:?}", e.kind()),
    }
}

fn listing(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = if entry.file_type()?.is_dir() { "/" } else { "" };
        names.push(format!("{}{kind}", entry.file_name().to_string_lossy()));
    }
    names.sort();
    Ok(names)
}

fn work(d: &Path) {
    show("list", listing(d));
    show("read in.txt", fs::read_to_string(d.join("in.txt")));
    show("len in.txt", fs::metadata(d.join("in.txt")).map(|m| (m.len(), m.is_file())));
    show("is_dir old-dir", fs::metadata(d.join("old-dir")).map(|m| m.is_dir()));
    show("write out.txt", fs::write(d.join("out.txt"), "written by the tool\n"));
    show("create_dir_all new/sub", fs::create_dir_all(d.join("new/sub")));
    show("write new/sub/deep.txt", fs::write(d.join("new/sub/deep.txt"), "deep\n"));
    show(
        "rename rename-me.txt new/renamed.txt",
        fs::rename(d.join("rename-me.txt"), d.join("new/renamed.txt")),
    );
    show("remove delete-me.txt", fs::remove_file(d.join("delete-me.txt")));
    show("remove_dir_all old-dir", fs::remove_dir_all(d.join("old-dir")));
    show(
        "append log.txt",
        OpenOptions::new()
            .append(true)
            .open(d.join("log.txt"))
            .and_then(|mut f| f.write_all(b"appended\n")),
    );
    show(
        "seek+read in.txt",
        fs::File::open(d.join("in.txt")).and_then(|mut f| {
            f.seek(SeekFrom::Start(3))?;
            let mut buf = [0u8; 4];
            f.read_exact(&mut buf)?;
            let end = f.seek(SeekFrom::End(-2))?;
            Ok((String::from_utf8_lossy(&buf).into_owned(), end))
        }),
    );
    show(
        "truncate out.txt to 7",
        OpenOptions::new()
            .write(true)
            .open(d.join("out.txt"))
            .and_then(|f| f.set_len(7)),
    );
    show(
        "overwrite in middle",
        OpenOptions::new()
            .write(true)
            .open(d.join("new/sub/deep.txt"))
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(1))?;
                f.write_all(b"EE")
            }),
    );
    show("read missing", fs::read(d.join("missing.txt")));
    show("create_dir existing new", fs::create_dir(d.join("new")));
    show("remove_dir non-empty new", fs::remove_dir(d.join("new")));
    show("remove_file a directory", fs::remove_file(d.join("new")));
    show("read a directory", fs::read(d.join("new")));
    show("read above the dir", fs::read(d.join("../etc/passwd")));
    show(
        "create_new existing",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.join("in.txt")),
    );
    show("write into a file as dir", fs::write(d.join("in.txt/x"), "x"));
    show("list new", listing(&d.join("new")));
    show("list", listing(d));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fs-tool DIR work|write-then-exit N|write-then-trap|write-then-spin|fill MIB");
        std::process::exit(2);
    };
    let d = Path::new(dir);
    match mode.as_str() {
        "work" => work(d),
        "write-then-exit" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            show("remove in.txt", fs::remove_file(d.join("in.txt")));
            let code = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
            std::process::exit(code);
        }
        "write-then-spin" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            let mut x: u64 = 1;
            while x != 0 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        "write-then-trap" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            panic!("trapping after a write");
        }
        "fill" => {
            let mib: usize = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
            let piece = vec![7u8; 64 << 10];
            let mut f = fs::File::create(d.join("big.bin")).expect("create big.bin");
            let mut written = 0usize;
            let mut result = Ok(());
            while written < mib << 20 {
                if let Err(e) = f.write_all(&piece) {
                    result = Err(e);
                    break;
                }
                written += piece.len();
            }
            println!("wrote {} KiB", written >> 10);
            show("fill", result);
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
