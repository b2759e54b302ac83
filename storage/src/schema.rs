//! The tables' Arrow schemas (documented in docs/storage.md).

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// `readings`: one row per stored reading, sorted by patient, metric, time.
pub static READINGS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", ts(), false),
        Field::new("patient_id", DataType::Utf8, true),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, true),
        Field::new("quality", DataType::UInt8, false),
        Field::new("received_at", ts(), false),
        Field::new("log_epoch", DataType::UInt64, false),
    ]))
});

/// `readings` sealed at rest (see [`crate::seal`]): `value` becomes
/// `value_sealed`, the value's 8 bytes (f64, little-endian) encrypted, and
/// `seal` holds, on the first row of each run of one patient's rows, the
/// run's key generation, nonce and tag (null on the other rows).
pub static READINGS_SEALED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = READINGS
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[readings::VALUE] = Field::new("value_sealed", DataType::FixedSizeBinary(8), false);
    fields.push(Field::new(
        "seal",
        DataType::FixedSizeBinary(crate::seal::SEAL_LEN as i32),
        true,
    ));
    Arc::new(Schema::new(fields))
});

pub mod readings {
    pub const TIME: usize = 0;
    pub const PATIENT: usize = 1;
    pub const DEVICE: usize = 2;
    pub const METRIC: usize = 3;
    pub const VALUE: usize = 4;
    pub const UNIT: usize = 5;
    pub const SEQ: usize = 6;
    pub const QUALITY: usize = 7;
    pub const RECEIVED: usize = 8;
    pub const LOG_EPOCH: usize = 9;
    /// In [`super::READINGS_SEALED`] only.
    pub const SEAL: usize = 10;
}

/// Whether a `readings` or `deadletters` batch is sealed at rest.
pub fn is_sealed(schema: &Schema) -> bool {
    schema.fields().len() > 10 && schema.field(10).name() == "seal"
}

/// `deadletters`: one row per rejected reading or payload.
pub static DEAD_LETTERS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("received_at", ts(), false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("patient_id", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, false),
        Field::new("time", ts(), true),
        Field::new("seq", DataType::UInt64, true),
        Field::new("log_epoch", DataType::UInt64, false),
    ]))
});

/// `deadletters` sealed at rest: `detail` and `raw` (which may hold the
/// patient's values) are empty strings, and `seal` holds key generation,
/// nonce and tag and `sealed` the encrypted JSON array `[detail, raw]`.
pub static DEAD_LETTERS_SEALED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = DEAD_LETTERS
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(
        "seal",
        DataType::FixedSizeBinary(crate::seal::SEAL_LEN as i32),
        false,
    ));
    fields.push(Field::new("sealed", DataType::Binary, false));
    Arc::new(Schema::new(fields))
});

pub mod dead_letters {
    pub const RECEIVED: usize = 0;
    pub const DEVICE: usize = 1;
    pub const PATIENT: usize = 2;
    pub const REASON: usize = 3;
    pub const DETAIL: usize = 4;
    pub const METRIC: usize = 5;
    pub const RAW: usize = 6;
    pub const TIME: usize = 7;
    pub const SEQ: usize = 8;
    pub const LOG_EPOCH: usize = 9;
    /// In [`super::DEAD_LETTERS_SEALED`] only.
    pub const SEAL: usize = 10;
    pub const SEALED: usize = 11;
}
