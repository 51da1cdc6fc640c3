//! The `[model]` table: which network to build.
//!
//! A table names a preset (`arch`) and overrides any of its keys, or gives the keys itself:
//!
//! ```toml
//! [model]
//! arch = "axial26s"      # optional when layers is given
//! variant = "official"   # "official" | "seed" | "resnet"
//! layers = [1, 2, 4, 1]  # blocks per stage
//! width = 0.5            # multiplier s of the channel widths
//! heads = 8
//! num_classes = 10
//! image_size = 32        # or [height, width]
//! attention = [true, true, true, true]  # seed variant: axial attention per stage
//! span = "global"        # or an integer K: the relative table covers offsets |i - j| <= K - 1
//! ```
//!
//! [`ModelSpec`] is the table as written; [`ModelSpec::resolve`] merges it onto its preset and
//! validates it into a [`ModelConfig`], whose [`ModelConfig::stages`] gives the geometry of every
//! block (channels, strides, the axis lengths each attention layer sees and its span).

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Which layout of the network, and so which parameter names and which maths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The authors' re-implementation (csrhddlam/axial-deeplab): bottleneck expansion 2,
    /// `bn_output`, AvgPool stride after the width layer, zero-init residual.
    Official,
    /// The seed project (MartinGer/Stand-Alone-Axial-Attention): ResNet widths, expansion 4,
    /// per-stage attention flags, stride in the first 1x1 conv, no output BN, k-before-q order and
    /// the opposite relative index sign.
    Seed,
    /// The conv-only ResNet baseline of the same depth (torchvision names, stride in the 3x3).
    Resnet,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Official => "official",
            Variant::Seed => "seed",
            Variant::Resnet => "resnet",
        }
    }

    /// Channels out of a bottleneck per channel of its inner width.
    pub fn expansion(self) -> i64 {
        match self {
            Variant::Official => 2,
            Variant::Seed | Variant::Resnet => 4,
        }
    }
}

/// The attention span of every axial layer.
///
/// - `Global`: each layer's relative table is sized for the axis length it sees at the configured
///   `image_size` (K = L), as in both references: global attention along the axis.
/// - `Window(K)`: every layer's table is `[2gp, 2K-1]`. An axis of length L <= K attends
///   globally (using the centre of the table); a longer one attends within `|i - j| <= K - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Global,
    Window(i64),
}

impl Span {
    /// Table size K for a layer that sees an axis of length `len` at the configured image size.
    pub fn table_len(self, len: i64) -> i64 {
        match self {
            Span::Global => len,
            Span::Window(k) => k,
        }
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Span::Global => s.serialize_str("global"),
            Span::Window(k) => s.serialize_i64(*k),
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            K(i64),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("span must be \"global\" or a positive integer K")
        })? {
            Raw::Name(s) if s == "global" => Ok(Span::Global),
            Raw::Name(s) => Err(serde::de::Error::custom(format!(
                "span = {s:?}: expected \"global\" or a positive integer K"
            ))),
            Raw::K(k) => Ok(Span::Window(k)),
        }
    }
}

/// Input height and width in pixels; a single integer in TOML means a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub height: i64,
    pub width: i64,
}

impl Serialize for ImageSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.height == self.width {
            s.serialize_i64(self.height)
        } else {
            [self.height, self.width].serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Square(i64),
            Pair(Vec<i64>),
        }
        let bad = || serde::de::Error::custom("image_size must be an integer or [height, width]");
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Square(n) => Ok(ImageSize {
                height: n,
                width: n,
            }),
            Raw::Pair(v) if v.len() == 2 => Ok(ImageSize {
                height: v[0],
                width: v[1],
            }),
            Raw::Pair(_) => Err(bad()),
        }
    }
}

/// The `[model]` table as written: every key optional, unknown keys rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<ImageSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_init_residual: Option<bool>,
}

/// A preset: the keys that `arch` stands for.
struct Preset {
    name: &'static str,
    variant: Variant,
    layers: [i64; 4],
    width: f64,
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "axial26s",
        variant: Variant::Official,
        layers: [1, 2, 4, 1],
        width: 0.5,
    },
    Preset {
        name: "axial50s",
        variant: Variant::Official,
        layers: [3, 4, 6, 3],
        width: 0.5,
    },
    Preset {
        name: "axial50m",
        variant: Variant::Official,
        layers: [3, 4, 6, 3],
        width: 0.75,
    },
    Preset {
        name: "axial50l",
        variant: Variant::Official,
        layers: [3, 4, 6, 3],
        width: 1.0,
    },
    Preset {
        name: "seed26",
        variant: Variant::Seed,
        layers: [1, 2, 4, 1],
        width: 1.0,
    },
    Preset {
        name: "seed38",
        variant: Variant::Seed,
        layers: [2, 3, 5, 2],
        width: 1.0,
    },
    Preset {
        name: "seed50",
        variant: Variant::Seed,
        layers: [3, 4, 6, 3],
        width: 1.0,
    },
    Preset {
        name: "resnet26",
        variant: Variant::Resnet,
        layers: [1, 2, 4, 1],
        width: 1.0,
    },
    Preset {
        name: "resnet50",
        variant: Variant::Resnet,
        layers: [3, 4, 6, 3],
        width: 1.0,
    },
];

/// Names of the presets, for help texts and error messages.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// A resolved, validated model configuration: everything needed to build the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    pub variant: Variant,
    pub layers: [i64; 4],
    pub width: f64,
    pub heads: i64,
    pub num_classes: i64,
    pub image_size: ImageSize,
    pub attention: [bool; 4],
    pub span: Span,
    pub zero_init_residual: bool,
}

/// Geometry of one bottleneck block at the configured image size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    pub in_channels: i64,
    /// Inner width of the bottleneck (`planes`): the channels the attention layers work on.
    pub planes: i64,
    pub out_channels: i64,
    pub stride: i64,
    pub attention: bool,
    /// (height, width) of the map the attention layers (or the 3x3 conv) see.
    pub attended: (i64, i64),
    /// Relative-table sizes K of the height and the width layer.
    pub span: (i64, i64),
    pub has_downsample: bool,
}

impl ModelSpec {
    /// Parses the `[model]` table of a TOML document (other tables are left to their owners).
    /// `origin` names the source in error messages (usually the file path).
    pub fn from_toml_document(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let Some(model) = doc.get("model") else {
            return Err(ConfigError::Missing {
                origin: origin.to_owned(),
                what: "table [model]".to_owned(),
            });
        };
        model
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: format!("{origin}: [model]"),
                message: e.to_string(),
            })
    }

    /// Merges this table onto its preset (when `arch` is given) and validates the result.
    pub fn resolve(&self) -> Result<ModelConfig, ConfigError> {
        let preset = match &self.arch {
            Some(name) => Some(PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
                ConfigError::invalid(
                    "model.arch",
                    format!("{name:?}"),
                    format!("one of {}", preset_names().join(", ")),
                )
            })?),
            None => None,
        };
        let variant = self
            .variant
            .or(preset.map(|p| p.variant))
            .unwrap_or(Variant::Official);
        let layers = match (&self.layers, preset) {
            (Some(v), _) => {
                let arr: [i64; 4] = v.as_slice().try_into().map_err(|_| {
                    ConfigError::invalid("model.layers", format!("{v:?}"), "exactly 4 block counts")
                })?;
                arr
            }
            (None, Some(p)) => p.layers,
            (None, None) => {
                return Err(ConfigError::Missing {
                    origin: "[model]".to_owned(),
                    what: format!(
                        "arch (one of {}) or layers ([4 block counts])",
                        preset_names().join(", ")
                    ),
                });
            }
        };
        let attention = match &self.attention {
            Some(v) => v.as_slice().try_into().map_err(|_| {
                ConfigError::invalid("model.attention", format!("{v:?}"), "exactly 4 booleans")
            })?,
            None => [variant != Variant::Resnet; 4],
        };
        let cfg = ModelConfig {
            arch: self.arch.clone(),
            variant,
            layers,
            width: self.width.or(preset.map(|p| p.width)).unwrap_or(1.0),
            heads: self.heads.unwrap_or(8),
            num_classes: self.num_classes.unwrap_or(1000),
            image_size: self.image_size.unwrap_or(ImageSize {
                height: 224,
                width: 224,
            }),
            attention,
            span: self.span.unwrap_or(Span::Global),
            zero_init_residual: self
                .zero_init_residual
                .unwrap_or(variant == Variant::Official),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ModelConfig {
    /// A preset with its defaults (224 px, 1000 classes, 8 heads, global span).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        ModelSpec {
            arch: Some(name.to_owned()),
            ..ModelSpec::default()
        }
        .resolve()
    }

    /// Reads the `[model]` table of a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        ModelSpec::from_toml_document(&text, &origin)?.resolve()
    }

    /// The resolved table, as TOML under `[model]` (saved with checkpoints).
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            model: &'a ModelConfig,
        }
        toml::to_string(&Doc { model: self }).unwrap_or_else(|e| format!("# unserializable: {e}"))
    }

    /// Stem output channels.
    pub fn stem_channels(&self) -> i64 {
        self.scaled(64)
    }

    /// Bottleneck inner width of stage `i` (0-based).
    pub fn planes(&self, stage: usize) -> i64 {
        let base = match self.variant {
            Variant::Official => 128,
            Variant::Seed | Variant::Resnet => 64,
        };
        self.scaled(base << stage)
    }

    /// Channels into the classifier.
    pub fn feature_channels(&self) -> i64 {
        self.planes(3) * self.variant.expansion()
    }

    fn scaled(&self, base: i64) -> i64 {
        // Python's int(base * s): truncation, as both references compute it.
        (base as f64 * self.width) as i64
    }

    /// Whether stage `i` uses axial attention (official: every stage; resnet: none).
    pub fn stage_has_attention(&self, stage: usize) -> bool {
        match self.variant {
            Variant::Official => true,
            Variant::Seed => self.attention[stage],
            Variant::Resnet => false,
        }
    }

    /// Geometry of every block, stage by stage, at the configured image size.
    pub fn stages(&self) -> Vec<Vec<BlockGeometry>> {
        let conv_out = |n: i64| (n - 1) / 2 + 1; // 7x7/2 pad 3, 3x3/2 pad 1, 1x1/2 pad 0
        let mut size = (
            conv_out(conv_out(self.image_size.height)),
            conv_out(conv_out(self.image_size.width)),
        );
        let mut in_channels = self.stem_channels();
        let mut stages = Vec::with_capacity(4);
        for stage in 0..4 {
            let planes = self.planes(stage);
            let out_channels = planes * self.variant.expansion();
            let attention = self.stage_has_attention(stage);
            let mut blocks = Vec::new();
            for b in 0..self.layers[stage] {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                // Official: attention at the input resolution, AvgPool after (floor).
                // Seed: the stride sits in the first 1x1 conv, attention on the subsampled map.
                let (attended, out) = match (self.variant, stride) {
                    (_, 1) => (size, size),
                    (Variant::Official, _) => (size, (size.0 / 2, size.1 / 2)),
                    (Variant::Seed, _) => {
                        let s = (conv_out(size.0), conv_out(size.1));
                        (s, s)
                    }
                    (Variant::Resnet, _) => (size, (conv_out(size.0), conv_out(size.1))),
                };
                blocks.push(BlockGeometry {
                    in_channels,
                    planes,
                    out_channels,
                    stride,
                    attention,
                    attended,
                    span: (
                        self.span.table_len(attended.0),
                        self.span.table_len(attended.1),
                    ),
                    has_downsample: stride != 1 || in_channels != out_channels,
                });
                in_channels = out_channels;
                size = out;
            }
            stages.push(blocks);
        }
        stages
    }

    /// Spatial size of the last stage's output at the configured image size.
    pub fn final_size(&self) -> (i64, i64) {
        let stages = self.stages();
        let last = stages[3].last().copied();
        match (self.variant, last) {
            (Variant::Official, Some(b)) if b.stride == 2 => (b.attended.0 / 2, b.attended.1 / 2),
            (Variant::Resnet, Some(b)) if b.stride == 2 => {
                ((b.attended.0 - 1) / 2 + 1, (b.attended.1 - 1) / 2 + 1)
            }
            (_, Some(b)) => b.attended,
            (_, None) => (0, 0),
        }
    }

    /// Checks every key against what the network can be built from; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, &n) in self.layers.iter().enumerate() {
            if !(1..=64).contains(&n) {
                return Err(ConfigError::invalid(
                    "model.layers",
                    format!("{:?}", self.layers),
                    format!("stage {} has {n} blocks; each stage needs 1..=64", i + 1),
                ));
            }
        }
        if !(self.width.is_finite() && self.width > 0.0 && self.width <= 16.0) {
            return Err(ConfigError::invalid(
                "model.width",
                self.width,
                "a multiplier s with 0 < s <= 16 (axial26s uses 0.5)",
            ));
        }
        if self.stem_channels() < 1 {
            return Err(ConfigError::invalid(
                "model.width",
                self.width,
                "too small: the stem would have no channels",
            ));
        }
        if !(1..=256).contains(&self.heads) {
            return Err(ConfigError::invalid("model.heads", self.heads, "1..=256"));
        }
        if !(1..=1_000_000).contains(&self.num_classes) {
            return Err(ConfigError::invalid(
                "model.num_classes",
                self.num_classes,
                "1..=1000000",
            ));
        }
        let ImageSize { height, width } = self.image_size;
        if !(1..=8192).contains(&height) || !(1..=8192).contains(&width) {
            return Err(ConfigError::invalid(
                "model.image_size",
                format!("[{height}, {width}]"),
                "each side in 1..=8192 pixels",
            ));
        }
        if let Span::Window(k) = self.span
            && !(1..=4096).contains(&k)
        {
            return Err(ConfigError::invalid(
                "model.span",
                k,
                "\"global\" or an integer K in 1..=4096",
            ));
        }
        match self.variant {
            Variant::Official if self.attention != [true; 4] => {
                return Err(ConfigError::invalid(
                    "model.attention",
                    format!("{:?}", self.attention),
                    "the official variant has attention in every stage; per-stage flags need variant = \"seed\"",
                ));
            }
            Variant::Resnet if self.attention != [false; 4] => {
                return Err(ConfigError::invalid(
                    "model.attention",
                    format!("{:?}", self.attention),
                    "the resnet baseline has no attention; use variant = \"seed\" for a hybrid",
                ));
            }
            _ => {}
        }
        for stage in 0..4 {
            if !self.stage_has_attention(stage) {
                continue;
            }
            let planes = self.planes(stage);
            if planes % self.heads != 0 || (planes / self.heads) % 2 != 0 {
                return Err(ConfigError::invalid(
                    "model.heads",
                    self.heads,
                    format!(
                        "stage {} has {planes} channels (width = {}); they must split into {} heads of an even depth",
                        stage + 1,
                        self.width,
                        self.heads
                    ),
                ));
            }
        }
        // Official strided blocks halve the map twice over: AvgPool (floor) after the attention,
        // a 1x1/2 conv (ceil) on the shortcut. On an odd axis the two disagree by one pixel and
        // the residual sum cannot be formed.
        if self.variant == Variant::Official {
            for (stage, blocks) in self.stages().iter().enumerate() {
                if let Some(b) = blocks.iter().find(|b| b.stride == 2)
                    && (b.attended.0 % 2 != 0 || b.attended.1 % 2 != 0)
                {
                    return Err(ConfigError::invalid(
                        "model.image_size",
                        format!("[{height}, {width}]"),
                        format!(
                            "stage {} of the official layout halves a {} x {} map, which needs even sides \
                             (AvgPool after the attention and the strided shortcut round odd sides apart); \
                             sides that are multiples of 32 always work",
                            stage + 1,
                            b.attended.0,
                            b.attended.1
                        ),
                    ));
                }
            }
        }
        let (h, w) = self.final_size();
        if h < 1 || w < 1 {
            return Err(ConfigError::invalid(
                "model.image_size",
                format!("[{height}, {width}]"),
                "too small: the last stage would have no pixels (use at least 32)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
        ModelSpec::from_toml_document(text, "test.toml")?.resolve()
    }

    #[test]
    fn preset_then_override() {
        let cfg = parse("[model]\narch = \"axial26s\"\nnum_classes = 10\nimage_size = 32\n")
            .expect("valid");
        assert_eq!(cfg.layers, [1, 2, 4, 1]);
        assert_eq!(cfg.width, 0.5);
        assert_eq!(cfg.num_classes, 10);
        assert_eq!(cfg.variant, Variant::Official);
        assert!(cfg.zero_init_residual);
        let cfg = parse("[model]\narch = \"axial26s\"\nlayers = [2, 2, 2, 2]\nwidth = 0.25\n")
            .expect("valid");
        assert_eq!(cfg.layers, [2, 2, 2, 2]);
        assert_eq!(cfg.width, 0.25);
    }

    #[test]
    fn custom_without_arch_defaults_width_one() {
        let cfg = parse("[model]\nlayers = [1, 1, 1, 1]\n").expect("valid");
        assert_eq!(cfg.width, 1.0);
        assert_eq!(cfg.arch, None);
    }

    #[test]
    fn geometry_matches_the_official_224_spans() {
        let cfg = ModelConfig::preset("axial50s").expect("preset");
        let spans: Vec<Vec<i64>> = cfg
            .stages()
            .iter()
            .map(|s| s.iter().map(|b| b.span.0).collect())
            .collect();
        assert_eq!(
            spans,
            vec![
                vec![56, 56, 56],
                vec![56, 28, 28, 28],
                vec![28, 14, 14, 14, 14, 14],
                vec![14, 7, 7]
            ]
        );
        assert_eq!(cfg.feature_channels(), 1024);
    }

    #[test]
    fn seed_spans_follow_image_size_over_4_8_16_32() {
        let cfg = ModelConfig::preset("seed26").expect("preset");
        let spans: Vec<i64> = cfg.stages().iter().map(|s| s[0].span.0).collect();
        assert_eq!(spans, vec![56, 28, 14, 7]);
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = parse("[model]\narch = \"seed26\"\nattention = [false, false, true, true]\nspan = 9\nimage_size = [48, 64]\n")
            .expect("valid");
        let back = ModelSpec::from_toml_document(&cfg.to_toml(), "resolved")
            .expect("parses")
            .resolve()
            .expect("valid");
        assert_eq!(cfg, back);
    }

    #[test]
    fn bad_tables_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[model]\narch = \"axial99\"\n", "model.arch"),
            ("[model]\nlayers = [1, 2, 3]\n", "model.layers"),
            ("[model]\nlayers = [1, 0, 1, 1]\n", "model.layers"),
            (
                "[model]\narch = \"axial26s\"\nwidth = -1.0\n",
                "model.width",
            ),
            ("[model]\narch = \"axial26s\"\nheads = 7\n", "model.heads"),
            (
                "[model]\narch = \"axial26s\"\nnum_classes = 0\n",
                "model.num_classes",
            ),
            (
                "[model]\narch = \"axial26s\"\nimage_size = 8\n",
                "model.image_size",
            ),
            ("[model]\narch = \"axial26s\"\nspan = 0\n", "model.span"),
            ("[model]\narch = \"axial26s\"\nspan = \"local\"\n", "span"),
            (
                "[model]\narch = \"axial26s\"\nattention = [true, false, true, true]\n",
                "model.attention",
            ),
            (
                "[model]\narch = \"resnet26\"\nattention = [true, true, true, true]\n",
                "model.attention",
            ),
            ("[model]\narch = \"axial26s\"\nheds = 8\n", "heds"),
            (
                "[model]\narch = \"axial26s\"\nvariant = \"tf\"\n",
                "variant",
            ),
            (
                "[model]\narch = \"axial26s\"\nimage_size = [1, 2, 3]\n",
                "image_size",
            ),
            ("[train]\nepochs = 1\n", "[model]"),
            ("[model\n", "test.toml"),
            ("[model]\nvariant = \"seed\"\n", "layers"),
            (
                "[model]\narch = \"axial26s\"\nimage_size = [44, 36]\n",
                "model.image_size",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(key),
                "{text:?} gave {err:?}, which does not name {key}"
            );
        }
    }
}
