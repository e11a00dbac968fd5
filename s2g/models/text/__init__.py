"""SD3 text stack written from scratch: CLIP-L / OpenCLIP bigG, the T5-v1.1 encoder, their tokenizers, and the
SD3 conditioning (prompt -> (context, pooled)); Wan 2.1's umT5 encoder, its tokenizer and Wan's conditioning
(prompt -> context). Weights use HF-transformers key names."""
from .clip import CLIPTextEncoder, load_clip
from .sd3 import SD3TextConditioner, load_sd3_text
from .t5 import T5Encoder, load_t5
from .tokenizers import CLIPTokenizer, T5Tokenizer, UMT5Tokenizer
from .umt5 import WAN_NEGATIVE_PROMPT, UMT5Encoder, WanTextConditioner, load_wan_text

__all__ = ["CLIPTextEncoder", "load_clip", "T5Encoder", "load_t5", "CLIPTokenizer", "T5Tokenizer",
           "SD3TextConditioner", "load_sd3_text", "UMT5Encoder", "UMT5Tokenizer", "WanTextConditioner",
           "load_wan_text", "WAN_NEGATIVE_PROMPT"]
