//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2, 4.2.2).
//!
//! Every register access comes from the guest and is checked: only 32-bit accesses at known
//! offsets (byte access to the configuration space), queue setup only before the driver is
//! ready, and a device that refuses its queues breaks the VM rather than the VMM. The register
//! map is the guest ABI's ([`bulwark_abi::virtio::mmio`]), shared with the guest's driver.

use std::sync::{Arc, Mutex};

use bulwark_abi::virtio::mmio::{MAGIC_VALUE, VENDOR_ID, VERSION, reg};
use virtio_queue::{Queue, QueueT};

use super::{DeviceFault, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::{BadAccess, BusDevice, DeviceRequest, DeviceState, RestoreError};
use crate::memory::GuestMemory;

/// A virtio device behind an MMIO register window.
pub struct MmioTransport<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    mem: GuestMemory,
    queue_sizes: Vec<u16>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, whose queues live in `mem`.
    pub fn new(device: Arc<Mutex<D>>, mem: GuestMemory) -> Result<Self, DeviceFault> {
        let queue_sizes = lock(&device).queue_max_sizes().to_vec();
        let queues = new_queues(&queue_sizes)?;
        Ok(Self {
            device,
            mem,
            queue_sizes,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        })
    }

    /// Sets the device up as a driver would, before the guest starts: accepts `features` (with
    /// VERSION_1), gives queue `i` `size` entries and the rings `rings[i]` (descriptor table,
    /// available ring, used ring), and sets DRIVER_OK. It goes through the same register
    /// writes and checks as the guest's own would, so the guest finds a live device and makes
    /// no set-up exits; it may still reset the device and set it up again.
    pub fn settle(
        &mut self,
        features: u64,
        size: u16,
        rings: &[(u64, u64, u64)],
    ) -> Result<(), DeviceFault> {
        // The queue's own checks would quietly keep its old size for a bad one.
        if rings.len() != self.queue_sizes.len()
            || !size.is_power_of_two()
            || self.queue_sizes.iter().any(|&max| size > max)
        {
            return Err(DeviceFault(format!(
                "cannot set up {} queues of {size} entries (the device has {} of at most {:?})",
                rings.len(),
                self.queue_sizes.len(),
                self.queue_sizes
            )));
        }
        let accepted = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        let (features_low, features_high) = halves(features | VIRTIO_F_VERSION_1);
        let mut writes = vec![
            (reg::STATUS, 0),
            (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER),
            (reg::DRIVER_FEATURES_SEL, 0),
            (reg::DRIVER_FEATURES, features_low),
            (reg::DRIVER_FEATURES_SEL, 1),
            (reg::DRIVER_FEATURES, features_high),
            (reg::STATUS, accepted),
        ];
        for (index, &(desc, avail, used)) in (0u32..).zip(rings) {
            writes.extend([(reg::QUEUE_SEL, index), (reg::QUEUE_NUM, u32::from(size))]);
            for (low_reg, high_reg, address) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
            ] {
                let (low, high) = halves(address);
                writes.extend([(low_reg, low), (high_reg, high)]);
            }
            writes.push((reg::QUEUE_READY, 1));
        }
        writes.push((reg::STATUS, accepted | status::DRIVER_OK));
        for (offset, value) in writes {
            match self.write_register(offset, value) {
                Some(Ok(_)) => {}
                Some(Err(fault)) => return Err(fault),
                None => return Err(DeviceFault(format!("no register at {offset:#x}"))),
            }
        }
        if self.status != accepted | status::DRIVER_OK {
            return Err(DeviceFault(format!(
                "the device refused its set-up (status {:#x})",
                self.status
            )));
        }
        Ok(())
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device is live.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) -> Result<(), DeviceFault> {
        lock(&self.device).reset();
        self.queues = new_queues(&self.queue_sizes)?;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        Ok(())
    }

    /// The guest wrote the status register.
    fn write_status(&mut self, value: u32) -> Result<DeviceRequest, DeviceFault> {
        if value == 0 {
            self.reset()?;
            return Ok(DeviceRequest::None);
        }
        // Status bits only accumulate; clearing one needs a reset.
        if value & self.status != self.status {
            return Err(DeviceFault(format!(
                "status {value:#x} clears bits of {:#x} without a reset",
                self.status
            )));
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Refuse: FEATURES_OK stays clear, as the spec asks.
                self.status = value & !status::FEATURES_OK;
                return Ok(DeviceRequest::None);
            }
        }
        if new & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                return Err(DeviceFault("DRIVER_OK before FEATURES_OK".into()));
            }
            for (i, q) in self.queues.iter().enumerate() {
                if !q.is_valid(&self.mem) {
                    return Err(DeviceFault(format!(
                        "queue {i} is not ready or its rings lie outside guest RAM"
                    )));
                }
            }
            // The device owns the queues from now on; a reset gives the transport fresh ones.
            let queues = std::mem::take(&mut self.queues);
            lock(&self.device).activate(self.mem.clone(), queues, self.driver_features)?;
        }
        self.status = value;
        Ok(DeviceRequest::None)
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let features = self.device_features();
        let queue_max = self
            .queues
            .get(self.queue_sel as usize)
            .map(|q| q.max_size());
        let queue_ready = self.queues.get(self.queue_sel as usize).map(|q| q.ready());
        Some(match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => (features & 0xffff_ffff) as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue_max.map_or(0, u32::from),
            reg::QUEUE_READY => u32::from(queue_ready.unwrap_or(false)),
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => return None,
        })
    }

    fn write_register(
        &mut self,
        offset: u64,
        value: u32,
    ) -> Option<Result<DeviceRequest, DeviceFault>> {
        let ok = Ok(DeviceRequest::None);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let (Some(q), Ok(n)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(n);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                if self.status & status::DRIVER_OK == 0 {
                    return Some(ok);
                }
                return Some(
                    lock(&self.device)
                        .queue_notify(value)
                        .map(|()| DeviceRequest::None),
                );
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => return Some(self.write_status(value)),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DESC_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(low, high);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DRIVER_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(low, high);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DEVICE_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(low, high);
                }
            }
            _ => return None,
        }
        Some(ok)
    }
}

fn new_queues(sizes: &[u16]) -> Result<Vec<Queue>, DeviceFault> {
    sizes
        .iter()
        .map(|&n| Queue::new(n).map_err(|e| DeviceFault(format!("queue size {n}: {e:?}"))))
        .collect()
}

/// The low and high 32 bits of `value`, as a pair of 32-bit registers takes it.
fn halves(value: u64) -> (u32, u32) {
    let [b0, b1, b2, b3, b4, b5, b6, b7] = value.to_le_bytes();
    (
        u32::from_le_bytes([b0, b1, b2, b3]),
        u32::from_le_bytes([b4, b5, b6, b7]),
    )
}

/// A register value as the (low, high) halves `Queue`'s address setters take.
fn split(low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(value), None)
    } else {
        (None, Some(value))
    }
}

/// Locks a device mutex; a poisoned lock (a panic elsewhere) still gives the device.
pub fn lock<D: ?Sized>(device: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The transport's registers and queue set-up, with its device's state.
struct TransportState {
    queues: Vec<virtio_queue::QueueState>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    device: DeviceState,
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn name(&self) -> &'static str {
        "virtio-mmio"
    }

    fn save(&self) -> DeviceState {
        Box::new(TransportState {
            queues: self.queues.iter().map(Queue::state).collect(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            device: lock(&self.device).save(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        let fail = |why: String| RestoreError {
            device: "virtio-mmio",
            why,
        };
        let state = state
            .downcast_ref::<TransportState>()
            .ok_or_else(|| fail("not a virtio-mmio transport's state".into()))?;
        self.queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(*q))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(format!("a saved queue: {e:?}")))?;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        lock(&self.device)
            .restore(&state.device)
            .map_err(|e| fail(e.0))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess> {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return Ok(DeviceRequest::None);
        }
        let value = match data.len() {
            4 => self.read_register(offset),
            _ => None,
        };
        match value {
            Some(v) => {
                data.copy_from_slice(&v.to_le_bytes());
                Ok(DeviceRequest::None)
            }
            None => Err(BadAccess {
                device: "virtio-mmio",
                what: "read",
                offset,
                len: data.len(),
            }),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess> {
        let bad = BadAccess {
            device: "virtio-mmio",
            what: "write",
            offset,
            len: data.len(),
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Err(bad);
        };
        match self.write_register(offset, u32::from_le_bytes(bytes)) {
            Some(Ok(req)) => Ok(req),
            Some(Err(fault)) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                Ok(DeviceRequest::DeviceBroken(fault.0))
            }
            None => Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::VsockDevice;
    use bulwark_abi::layout;
    use bulwark_abi::virtio::vsock::{F_STREAM, QUEUE_COUNT, QUEUE_SIZE};
    use vm_memory::GuestAddress;

    fn transport(name: &str) -> MmioTransport<VsockDevice> {
        let dir = std::env::temp_dir().join(format!("bulwark-mmio-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let device = VsockDevice::new(3, &dir.join("v.sock")).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        MmioTransport::new(Arc::new(Mutex::new(device)), mem).unwrap()
    }

    fn read(t: &mut MmioTransport<VsockDevice>, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        t.read(offset, &mut v).unwrap();
        u32::from_le_bytes(v)
    }

    #[test]
    fn settle_leaves_the_device_live_as_a_driver_would() {
        let mut t = transport("settle");
        let rings: Vec<_> = (0..QUEUE_COUNT as u64)
            .map(layout::virtqueue_rings)
            .collect();
        t.settle(F_STREAM, QUEUE_SIZE, &rings).unwrap();
        let live = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(read(&mut t, reg::STATUS), live);
        // The queues belong to the device now: a driver can no longer change them.
        t.write(reg::QUEUE_SEL, &0u32.to_le_bytes()).unwrap();
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0, "handed to the device");
        // The guest may still reset the device and set it up itself.
        t.write(reg::STATUS, &0u32.to_le_bytes()).unwrap();
        assert_eq!(read(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn settle_refuses_rings_outside_guest_ram_or_oversized_queues() {
        let mut t = transport("settle-bad");
        let outside = vec![(1 << 40, 1 << 40, 1 << 40); QUEUE_COUNT];
        assert!(t.settle(F_STREAM, QUEUE_SIZE, &outside).is_err());
        let mut t = transport("settle-big");
        let rings: Vec<_> = (0..QUEUE_COUNT as u64)
            .map(layout::virtqueue_rings)
            .collect();
        assert!(
            t.settle(F_STREAM, 1024, &rings).is_err(),
            "over QUEUE_MAX_SIZE"
        );
        assert!(
            t.settle(F_STREAM, 48, &rings).is_err(),
            "not a power of two"
        );
        assert!(
            t.settle(F_STREAM, QUEUE_SIZE, &rings[..2]).is_err(),
            "a queue short"
        );
        assert!(t.settle(F_STREAM, QUEUE_SIZE, &rings).is_ok());
    }
}
