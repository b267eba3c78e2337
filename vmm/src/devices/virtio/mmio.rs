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
use crate::devices::{BadAccess, BusDevice, DeviceRequest};
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

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn name(&self) -> &'static str {
        "virtio-mmio"
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
