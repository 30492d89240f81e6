"""CLIP teacher: open_clip loading (tags, files, local-dir, tiny test model), prompt sets, text classifier, zero-shot.

open_clip itself is imported lazily, inside the functions that need it.
"""
from richkd.clip.loading import (TINY_CLIP_CONFIG, TINY_CLIP_MODEL, ClipLoadError, PretrainedRef,
                                 check_weights, init_tiny_clip, load_clip, parse_pretrained, register_tiny_config)
from richkd.clip.prompts import (PROMPT_SETS, PromptSet, PromptSetError, clean_class_name, format_prompts,
                                 load_prompt_set, prompt_set_hash, validate_templates)
from richkd.clip.teacher import ClipTeacher, average_prompt_embeddings, preprocess_images, zero_shot_accuracy
