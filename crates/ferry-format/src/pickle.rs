//! A small pickle VM that understands exactly what `torch.save` writes for a map of tensors, and
//! nothing else: it never imports or calls anything.
//!
//! Accepted opcodes: `PROTO FRAME STOP MARK EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1-3
//! BINUNICODE SHORT_BINUNICODE BINUNICODE8 BININT BININT1 BININT2 LONG1 NONE NEWTRUE NEWFALSE
//! BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BINPERSID SETITEM
//! SETITEMS APPEND APPENDS`. Accepted globals: `collections.OrderedDict` (called with no
//! arguments: an empty dict), `torch._utils._rebuild_tensor_v2` and `torch._utils._rebuild_tensor`
//! (which become tensor records, not calls), and `torch.<X>Storage` for the ten storage classes
//! whose dtype ferry has (as the type tag of a persistent storage record). Anything else is
//! [`Error::Corrupt`] naming the opcode or global and the file.
//!
//! Every length and count is bounded (see [`crate::limits`]); compound values are reference
//! counted (a memo `GET` is O(1)), and dicts and lists live in an arena owned by the VM, so no
//! crafted input can make dropping values recurse deeply.

use ferry_core::{DType, Error, Result};
use std::collections::HashMap;
use std::rc::Rc;

use crate::limits::{
    MAX_GLOBAL_LINE, MAX_NDIM, MAX_PICKLE_BYTES, MAX_PICKLE_DEPTH, MAX_PICKLE_MEMO, MAX_PICKLE_STACK,
    MAX_PICKLE_STRING, MAX_PICKLE_VALUES, MAX_TENSOR_DIMS, MAX_TENSORS,
};

/// A persistent storage record: `('storage', torch.<X>Storage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub(crate) dtype: DType,
    pub(crate) key: Rc<str>,
    pub(crate) numel: u64,
}

/// One `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` call, not executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRecord {
    pub(crate) storage: Rc<StorageRef>,
    pub(crate) offset: u64,
    pub(crate) shape: Vec<u64>,
    pub(crate) strides: Vec<u64>,
}

/// The torch storage classes and their dtypes.
pub(crate) const STORAGE_CLASSES: [(&str, DType); 10] = [
    ("FloatStorage", DType::Float32),
    ("DoubleStorage", DType::Float64),
    ("HalfStorage", DType::Float16),
    ("BFloat16Storage", DType::BFloat16),
    ("LongStorage", DType::Int64),
    ("IntStorage", DType::Int32),
    ("ShortStorage", DType::Int16),
    ("CharStorage", DType::Int8),
    ("ByteStorage", DType::UInt8),
    ("BoolStorage", DType::Bool),
];

/// Torch storage classes whose dtype ferry does not have, with the dtype's torch name.
const UNSUPPORTED_STORAGES: [(&str, &str); 12] = [
    ("ComplexFloatStorage", "complex64"),
    ("ComplexDoubleStorage", "complex128"),
    ("ComplexHalfStorage", "complex32"),
    ("QInt8Storage", "qint8"),
    ("QUInt8Storage", "quint8"),
    ("QInt32Storage", "qint32"),
    ("QUInt4x2Storage", "quint4x2"),
    ("QUInt2x4Storage", "quint2x4"),
    ("UInt16Storage", "uint16"),
    ("UInt32Storage", "uint32"),
    ("UInt64Storage", "uint64"),
    ("Float8_e4m3fnStorage", "float8_e4m3fn"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    Storage(DType),
}

#[derive(Debug)]
struct Tuple {
    items: Box<[Value]>,
    depth: u32,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    /// A bool (only `requires_grad` uses one; its value does not matter to ferry).
    Bool,
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Tuple>),
    /// Index into the VM's dict arena.
    Dict(usize),
    /// Index into the VM's list arena.
    List(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRecord>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Str(_) => "a str",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::List(_) => "a list",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(t) => t.depth,
            _ => 0,
        }
    }
}

/// The standard name of a pickle opcode, for messages about unsupported ones.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

struct Vm<'a> {
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    dicts: Vec<Vec<(Value, Value)>>,
    lists: Vec<Vec<Value>>,
    created: usize,
    /// Tensor records rebuilt so far (at most [`MAX_TENSORS`]).
    tensors: usize,
    /// Dimensions built so far, for tensor records and returned entries (at most
    /// [`MAX_TENSOR_DIMS`]).
    dims: usize,
    what: &'a str,
}

impl<'a> Vm<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Corrupt { what: format!("data.pkl of torch file {}", self.what), message: message.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.code.len());
        let Some(end) = end else {
            return Err(self.err(format!("pickle truncated: {n} bytes wanted at byte {}", self.pos)));
        };
        let s = &self.code[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Ok(u64::from_le_bytes(b))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        self.created += 1;
        if self.created > MAX_PICKLE_VALUES {
            return Err(self.err(format!("more than {MAX_PICKLE_VALUES} pickle values")));
        }
        if self.stack.len() + self.marks.len() >= MAX_PICKLE_STACK {
            return Err(self.err(format!("pickle stack deeper than {MAX_PICKLE_STACK}")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self, op: &str) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{op} on an empty stack at byte {}", self.pos)));
        }
        self.stack.pop().ok_or_else(|| self.err(format!("{op} on an empty stack")))
    }

    fn pop_mark(&mut self, op: &str) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(format!("{op} without a MARK at byte {}", self.pos)));
        };
        Ok(self.stack.split_off(mark))
    }

    fn string(&mut self, len: u64) -> Result<Value> {
        if len > MAX_PICKLE_STRING as u64 {
            return Err(self.err(format!("string of {len} bytes exceeds the {MAX_PICKLE_STRING}-byte limit")));
        }
        let at = self.pos;
        let bytes = self.take(len as usize)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.err(format!("string at byte {at} is not valid UTF-8")))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_PICKLE_DEPTH {
            return Err(self.err(format!("tuples nested deeper than {MAX_PICKLE_DEPTH}")));
        }
        Ok(Value::Tuple(Rc::new(Tuple { items: items.into_boxed_slice(), depth })))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.code[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE + 1)];
        let Some(n) = window.iter().position(|&b| b == b'\n') else {
            return Err(
                self.err(format!("GLOBAL name at byte {} is unterminated or longer than {MAX_GLOBAL_LINE}", self.pos))
            );
        };
        let at = self.pos;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| self.err(format!("GLOBAL name at byte {at} is not UTF-8")))
    }

    fn global(&self, module: &str, name: &str) -> Result<Global> {
        match (module, name) {
            ("collections", "OrderedDict") => return Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => return Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_tensor") => return Ok(Global::RebuildTensor),
            _ => {}
        }
        if module == "torch" {
            if let Some((_, dtype)) = STORAGE_CLASSES.iter().find(|(n, _)| *n == name) {
                return Ok(Global::Storage(*dtype));
            }
            if let Some((_, dtype)) = UNSUPPORTED_STORAGES.iter().find(|(n, _)| *n == name) {
                return Err(self.err(format!(
                    "storage class torch.{name} holds dtype {dtype}, which ferry does not support (supported: float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool)"
                )));
            }
            if name.ends_with("Storage") {
                return Err(self.err(format!(
                    "unsupported storage class {:?}: its dtype is not one ferry supports",
                    format!("torch.{name}")
                )));
            }
        }
        Err(self.err(format!(
            "disallowed global {:?}: ferry only rebuilds tensors (allowed: collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor, torch.<dtype>Storage)",
            format!("{module}.{name}")
        )))
    }

    /// Counts `ndim` more dimensions against [`MAX_TENSOR_DIMS`], before they are built.
    fn charge_dims(&mut self, ndim: usize) -> Result<()> {
        self.dims = self.dims.saturating_add(ndim);
        if self.dims > MAX_TENSOR_DIMS {
            return Err(self.err(format!(
                "tensor records hold more than {MAX_TENSOR_DIMS} dimensions in total (the MAX_TENSOR_DIMS limit)"
            )));
        }
        Ok(())
    }

    fn int_arg(&self, v: &Value, what: &str) -> Result<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            Value::Int(i) => Err(self.err(format!("{what} is negative ({i})"))),
            other => Err(self.err(format!("{what} is {}, not an int", other.kind()))),
        }
    }

    fn dims(&self, v: &Value, what: &str) -> Result<Vec<u64>> {
        let Value::Tuple(t) = v else {
            return Err(self.err(format!("tensor {what} is {}, not a tuple", v.kind())));
        };
        if t.items.len() > MAX_NDIM {
            return Err(self.err(format!("tensor {what} has {} dimensions; at most {MAX_NDIM}", t.items.len())));
        }
        t.items.iter().map(|d| self.int_arg(d, &format!("a tensor {what} entry"))).collect()
    }

    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id is {}, not a tuple", pid.kind())));
        };
        let bad = || self.err("persistent id is not ('storage', torch.<X>Storage, key, location, numel)");
        let [tag, class, key, location, numel] = &t.items[..] else { return Err(bad()) };
        match tag {
            Value::Str(s) if &**s == "storage" => {}
            _ => return Err(bad()),
        }
        let Value::Global(Global::Storage(dtype)) = class else {
            return Err(self.err(format!("persistent storage type is {}, not a torch storage class", class.kind())));
        };
        let Value::Str(key) = key else { return Err(bad()) };
        let Value::Str(_) = location else { return Err(bad()) };
        let numel = self.int_arg(numel, "storage element count")?;
        Ok(Value::Storage(Rc::new(StorageRef { dtype: *dtype, key: key.clone(), numel })))
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!("REDUCE calls {}, not an allowed global", callable.kind())));
        };
        let Value::Tuple(args) = args else {
            return Err(self.err(format!("REDUCE arguments are {}, not a tuple", args.kind())));
        };
        match g {
            Global::OrderedDict => {
                if !args.items.is_empty() {
                    return Err(self.err("collections.OrderedDict called with arguments"));
                }
                self.dicts.push(Vec::new());
                Ok(Value::Dict(self.dicts.len() - 1))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let n = args.items.len();
                let ok_len = if g == Global::RebuildTensorV2 { n == 6 || n == 7 } else { n == 4 };
                if !ok_len {
                    return Err(self.err(format!("tensor rebuild called with {n} arguments")));
                }
                let Value::Storage(storage) = &args.items[0] else {
                    return Err(
                        self.err(format!("tensor storage is {}, not a persistent storage", args.items[0].kind()))
                    );
                };
                let offset = self.int_arg(&args.items[1], "tensor storage offset")?;
                self.tensors += 1;
                if self.tensors > MAX_TENSORS {
                    return Err(self.err(format!(
                        "more than {MAX_TENSORS} tensor records (the MAX_TENSORS limit on tensors in one file)"
                    )));
                }
                let ndim = |v: &Value| match v {
                    Value::Tuple(t) => t.items.len().min(MAX_NDIM + 1),
                    _ => 0,
                };
                self.charge_dims(ndim(&args.items[2]) + ndim(&args.items[3]))?;
                let shape = self.dims(&args.items[2], "size")?;
                let strides = self.dims(&args.items[3], "stride")?;
                if shape.len() != strides.len() {
                    return Err(self.err(format!(
                        "tensor size has {} dimensions but its stride has {}",
                        shape.len(),
                        strides.len()
                    )));
                }
                if g == Global::RebuildTensorV2 {
                    if !matches!(args.items[4], Value::Bool) {
                        return Err(self.err(format!("requires_grad is {}, not a bool", args.items[4].kind())));
                    }
                    for extra in &args.items[5..] {
                        if !matches!(extra, Value::Dict(_) | Value::None) {
                            return Err(self.err(format!("tensor hooks/metadata are {}, not a dict", extra.kind())));
                        }
                    }
                }
                Ok(Value::Tensor(Rc::new(TensorRecord { storage: storage.clone(), offset, shape, strides })))
            }
            Global::Storage(_) => Err(self.err("a storage class is called directly; torch never does this")),
        }
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let Some(top) = self.stack.last().cloned() else {
            return Err(self.err(format!("memo PUT on an empty stack at byte {}", self.pos)));
        };
        if self.memo.len() >= MAX_PICKLE_MEMO && !self.memo.contains_key(&key) {
            return Err(self.err(format!("more than {MAX_PICKLE_MEMO} memo entries")));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let Some(v) = self.memo.get(&key).cloned() else {
            return Err(self.err(format!("memo key {key} is used before it is defined (byte {})", self.pos)));
        };
        self.push(v)
    }

    fn dict_target(&self, below: usize, op: &str) -> Result<usize> {
        match below.checked_sub(1).and_then(|i| self.stack.get(i)) {
            Some(Value::Dict(id)) => Ok(*id),
            Some(other) => Err(self.err(format!("{op} on {}, not a dict", other.kind()))),
            None => Err(self.err(format!("{op} with no dict below it"))),
        }
    }

    /// A torch file's dicts are its tensor map and empty hook dicts: none may grow past
    /// [`MAX_TENSORS`] entries (checked as it grows, before the VM holds millions of items).
    fn check_dict_len(&self, id: usize, more: usize) -> Result<()> {
        let len = self.dicts.get(id).map_or(0, Vec::len);
        if len + more > MAX_TENSORS {
            return Err(self.err(format!(
                "a dict of more than {MAX_TENSORS} entries: at most {MAX_TENSORS} tensors are accepted (the MAX_TENSORS limit)"
            )));
        }
        Ok(())
    }

    fn list_target(&self, below: usize, op: &str) -> Result<usize> {
        match below.checked_sub(1).and_then(|i| self.stack.get(i)) {
            Some(Value::List(id)) => Ok(*id),
            Some(other) => Err(self.err(format!("{op} on {}, not a list", other.kind()))),
            None => Err(self.err(format!("{op} with no list below it"))),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!("pickle protocol {v} is not supported (torch writes 2)")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME length: framing is only a read-ahead hint
                }
                b'.' => {
                    let result = self.pop("STOP")?;
                    if self.pos != self.code.len() {
                        return Err(self.err(format!("{} trailing bytes after STOP", self.code.len() - self.pos)));
                    }
                    return Ok(result);
                }
                b'(' => {
                    if self.stack.len() + self.marks.len() >= MAX_PICKLE_STACK {
                        return Err(self.err(format!("pickle stack deeper than {MAX_PICKLE_STACK}")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'}' => {
                    self.dicts.push(Vec::new());
                    self.push(Value::Dict(self.dicts.len() - 1))?;
                }
                b']' => {
                    self.lists.push(Vec::new());
                    self.push(Value::List(self.lists.len() - 1))?;
                }
                b')' => self.push(self.tuple(Vec::new())?)?,
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.err(format!("{} on a stack with fewer than {n} items", opcode_name(op))));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(n.into())?;
                    self.push(s)?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(n.into())?;
                    self.push(s)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(s)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))?;
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(self.err(format!("LONG1 integer of {n} bytes does not fit 64 bits")));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = [0u8; 8];
                    buf[..n].copy_from_slice(bytes);
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        buf[n..].fill(0xff); // sign-extend
                    }
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Bool)?,
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err("memo overflow"))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                0x93 => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL operands are not strings"));
                    };
                    let g = self.global(&module, &name)?;
                    self.push(Value::Global(g))?;
                }
                b'R' => {
                    let args = self.pop("REDUCE")?;
                    let callable = self.pop("REDUCE")?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                b'Q' => {
                    let pid = self.pop("BINPERSID")?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?;
                }
                b's' => {
                    let value = self.pop("SETITEM")?;
                    let key = self.pop("SETITEM")?;
                    let id = self.dict_target(self.stack.len(), "SETITEM")?;
                    self.check_dict_len(id, 1)?;
                    self.dicts[id].push((key, value));
                }
                b'u' => {
                    let items = self.pop_mark("SETITEMS")?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let id = self.dict_target(self.stack.len(), "SETITEMS")?;
                    self.check_dict_len(id, items.len() / 2)?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        self.dicts[id].push((k, v));
                    }
                }
                b'a' => {
                    let value = self.pop("APPEND")?;
                    let id = self.list_target(self.stack.len(), "APPEND")?;
                    self.lists[id].push(value);
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    let id = self.list_target(self.stack.len(), "APPENDS")?;
                    self.lists[id].extend(items);
                }
                other => {
                    return Err(self.err(format!(
                        "unsupported pickle opcode {} (0x{other:02x}) at byte {at}: torch tensor files never use it",
                        opcode_name(other)
                    )));
                }
            }
        }
    }
}

/// Runs `data.pkl` and returns the name → tensor record map it describes, in the dict's order.
/// `what` names the file in errors.
///
/// A record shared by several names (a memo `GET`) is returned shared, never copied; every name
/// still counts against [`MAX_TENSORS`] and its record's dimensions against [`MAX_TENSOR_DIMS`],
/// since the caller builds a table entry for each.
pub(crate) fn load_tensor_map(code: &[u8], what: &str) -> Result<Vec<(String, Rc<TensorRecord>)>> {
    let mut vm = Vm {
        code,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        dicts: Vec::new(),
        lists: Vec::new(),
        created: 0,
        tensors: 0,
        dims: 0,
        what,
    };
    if code.len() > MAX_PICKLE_BYTES {
        return Err(vm.err(format!("data.pkl is {} bytes; at most {MAX_PICKLE_BYTES} are accepted", code.len())));
    }
    let top = vm.run()?;
    let Value::Dict(id) = top else {
        return Err(vm.err(format!("the saved object is {}, not a dict of tensors", top.kind())));
    };
    let items = std::mem::take(&mut vm.dicts[id]);
    if items.len() > MAX_TENSORS {
        return Err(vm.err(format!(
            "the saved dict has {} entries; at most {MAX_TENSORS} tensors are accepted (the MAX_TENSORS limit)",
            items.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let Value::Str(name) = key else {
            return Err(vm.err(format!("a dict key is {}, not a str", key.kind())));
        };
        let tensor = match value {
            Value::Tensor(t) => t,
            Value::Dict(_) | Value::List(_) | Value::Tuple(_) => {
                return Err(vm.err(format!(
                    "the value under key {name:?} is {}: nested containers are not supported (ferry reads a flat name -> tensor map)",
                    value.kind()
                )));
            }
            other => {
                return Err(vm.err(format!("the value under key {name:?} is {}, not a tensor", other.kind())));
            }
        };
        if !seen.insert(name.clone()) {
            return Err(vm.err(format!("key {name:?} appears twice")));
        }
        // Both the shape and the strides, as the caller copies them into the entry's layout.
        vm.charge_dims(tensor.shape.len() + tensor.strides.len())?;
        out.push((name.to_string(), tensor));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &[u8]) -> String {
        load_tensor_map(code, "t").unwrap_err().to_string()
    }

    #[test]
    fn empty_dict_and_ordered_dict_load() {
        assert!(load_tensor_map(b"\x80\x02}q\x00.", "t").unwrap().is_empty());
        assert!(load_tensor_map(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.", "t").unwrap().is_empty());
    }

    #[test]
    fn refusals_name_what_was_wrong() {
        assert!(err(b"\x80\x02cos\nsystem\n.").contains("disallowed global \"os.system\""));
        assert!(err(b"\x80\x02}b.").contains("BUILD"));
        assert!(err(b"\x80\x02K\x01.").contains("an int, not a dict"));
        assert!(err(b"\x80\x02}.junk").contains("trailing bytes"));
        assert!(err(b"\x80\x02}h\x05.").contains("memo key 5"));
        assert!(err(b"\x80\x02}X\xff\xff\xff\xff").contains("exceeds"));
        assert!(err(b"\x80\x02ctorch\nComplexFloatStorage\n.").contains("complex64"));
        assert!(err(b"\x80\x02").contains("truncated"));
        assert!(err(b"\x80\x02}X\x01\x00\x00\x00a}s.").contains("nested containers"));
        assert!(err(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.").contains("not a tensor"));
    }

    #[test]
    fn deep_tuples_are_refused_without_recursion() {
        let mut code = b"\x80\x02".to_vec();
        code.push(b')');
        code.extend(std::iter::repeat_n(0x85u8, 100_000));
        code.push(b'.');
        assert!(err(&code).contains("nested deeper"));
    }

    #[test]
    fn huge_stacks_are_refused() {
        let mut code = b"\x80\x02".to_vec();
        code.extend(std::iter::repeat_n(b'N', MAX_PICKLE_STACK + 10));
        assert!(err(&code).contains("stack deeper"));
    }
}
