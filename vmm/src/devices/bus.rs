//! A map from address ranges (ports or guest-physical MMIO addresses) to devices.

use std::collections::BTreeMap;

use super::{BusDevice, DeviceState, RestoreError};

/// Errors from registering a device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The new range is empty, wraps around, or overlaps one already registered.
    #[error(
        "cannot register [{base:#x}, +{len:#x}): empty, wrapping, or overlapping another device"
    )]
    BadRange {
        /// First address of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    len: u64,
    device: Box<dyn BusDevice>,
}

/// Non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let bad = BusError::BadRange { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| bad.clone())?;
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(&b, e)| b + e.len > base) {
            return Err(bad);
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + len)`, with `addr`'s offset into it.
    pub fn get(&mut self, addr: u64, len: usize) -> Option<(u64, &mut dyn BusDevice)> {
        let (&base, entry) = self.ranges.range_mut(..=addr).next_back()?;
        let offset = addr - base;
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= entry.len);
        fits.then_some((offset, entry.device.as_mut()))
    }

    /// Every device's state, in address order (see [`BusDevice::save`]).
    pub fn save(&self) -> Vec<DeviceState> {
        self.ranges.values().map(|e| e.device.save()).collect()
    }

    /// Puts back states [`Bus::save`] took of this bus (see [`BusDevice::restore`]).
    pub fn restore(&mut self, states: &[DeviceState]) -> Result<(), RestoreError> {
        if states.len() != self.ranges.len() {
            return Err(RestoreError {
                device: "bus",
                why: format!("{} states for {} devices", states.len(), self.ranges.len()),
            });
        }
        for (entry, state) in self.ranges.values_mut().zip(states) {
            entry.device.restore(state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{BadAccess, DeviceRequest};

    struct Dummy(&'static str);

    impl BusDevice for Dummy {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess> {
            data.fill(u8::try_from(offset).expect("test offsets fit a byte"));
            Ok(DeviceRequest::None)
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) -> Result<DeviceRequest, BadAccess> {
            Ok(DeviceRequest::None)
        }
        fn save(&self) -> DeviceState {
            Box::new(self.0)
        }
        fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
            self.0 = *state.downcast_ref::<&'static str>().ok_or(RestoreError {
                device: "dummy",
                why: "not a name".into(),
            })?;
            Ok(())
        }
    }

    #[test]
    fn saves_and_restores_every_device_in_order() {
        let mut bus = Bus::new();
        bus.insert(0x10, 1, Box::new(Dummy("a"))).unwrap();
        bus.insert(0x20, 1, Box::new(Dummy("b"))).unwrap();
        let saved = bus.save();
        let mut other = Bus::new();
        other.insert(0x10, 1, Box::new(Dummy("x"))).unwrap();
        other.insert(0x20, 1, Box::new(Dummy("y"))).unwrap();
        other.restore(&saved).unwrap();
        assert_eq!(other.get(0x10, 1).unwrap().1.name(), "a");
        assert_eq!(other.get(0x20, 1).unwrap().1.name(), "b");
        assert!(other.restore(&saved[..1]).is_err(), "a state per device");
    }

    #[test]
    fn routes_accesses_inside_ranges_only() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Box::new(Dummy("uart"))).unwrap();
        bus.insert(0x600, 8, Box::new(Dummy("ctl"))).unwrap();
        let (off, dev) = bus.get(0x3fa, 1).unwrap();
        assert_eq!((off, dev.name()), (2, "uart"));
        let (off, dev) = bus.get(0x604, 4).unwrap();
        assert_eq!((off, dev.name()), (4, "ctl"));
        assert!(bus.get(0x3f7, 1).is_none());
        assert!(bus.get(0x400, 1).is_none());
        assert!(bus.get(0x606, 4).is_none(), "access straddling the end");
        assert!(bus.get(u64::MAX, 8).is_none());
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Box::new(Dummy("a"))).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0xf8, 0x10),
            (0x10f, 4),
            (0x90, 0x100),
            (0x200, 0),
            (u64::MAX, 2),
        ] {
            assert!(
                bus.insert(base, len, Box::new(Dummy("b"))).is_err(),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(0x110, 0x10, Box::new(Dummy("c"))).unwrap();
        bus.insert(0xf0, 0x10, Box::new(Dummy("d"))).unwrap();
    }
}
