//! Fuzzes the vsock device's view of guest memory: descriptor tables, available rings, packet
//! headers and lengths all come from the input, which is copied to the start of guest RAM. The
//! device must answer with RST or a device fault, never panic or touch memory outside RAM.
//!
//! Layout of guest RAM (each queue has 16 entries): RX queue at 0x0 (descriptors), 0x400
//! (available ring), 0x800 (used ring); TX at 0x1000/0x1400/0x1800; event at 0x2000/0x2400/0x2800.
//! Buffers the descriptors point at can be anywhere, in or out of the 256 KiB of RAM.

#![no_main]

use std::cell::RefCell;

use bulwark_vmm::devices::virtio::VirtioDevice;
use bulwark_vmm::devices::virtio::vsock::VsockDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: usize = 256 << 10;
const QUEUES: [(u32, u32, u32); 3] = [
    (0x0, 0x400, 0x800),
    (0x1000, 0x1400, 0x1800),
    (0x2000, 0x2400, 0x2800),
];

thread_local! {
    static DEVICE: RefCell<VsockDevice> = RefCell::new({
        let dir = std::env::temp_dir().join(format!("bulwark-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        VsockDevice::new(3, &path).expect("vsock device")
    });
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM");
    mem.write_slice(&data[..data.len().min(RAM)], GuestAddress(0))
        .expect("input fits RAM");
    let queues: Vec<Queue> = QUEUES
        .iter()
        .map(|&(desc, avail, used)| {
            let mut q = Queue::new(16).expect("queue");
            q.set_size(16);
            q.set_desc_table_address(Some(desc), Some(0));
            q.set_avail_ring_address(Some(avail), Some(0));
            q.set_used_ring_address(Some(used), Some(0));
            q.set_ready(true);
            q
        })
        .collect();
    DEVICE.with(|device| {
        let mut device = device.borrow_mut();
        device.reset();
        if device.activate(mem, queues, 0).is_ok() {
            // TX first (guest packets), then RX (answers into the guest's buffers).
            let _ = device.queue_notify(1);
            let _ = device.queue_notify(0);
        }
    });
});
