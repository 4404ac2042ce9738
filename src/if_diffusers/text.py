"""Caption cleaning for T5, written once: the original IF's `deepfloyd_if.modules.t5.T5Embedder.clean_caption`
(copied verbatim into each of diffusers' six IF pipelines), applied twice as both do."""

from __future__ import annotations

import html
import re
import urllib.parse

_BAD_PUNCTUATION = re.compile(r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)" + r"\(" + r"\]" + r"\[" + r"\}" + r"\{" + r"\|" + "\\"
                              + r"\/" + r"\*" + r"]{1,}")  # fmt: skip
_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31"
           r"\uFE32\uFE58\uFE63\uFF0D]+")  # fmt: skip

# (pattern, replacement) in the original's order, before the HTML is stripped ...
_BEFORE_HTML = [
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + "))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL + "))", ""),
]
# ... after it, up to the dash rule ...
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @nickname
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, CJK ideographs (ext. A, hexagrams, unified)
    *[
        (rf"[{block}]+", "")
        for block in (
            r"\u31c0-\u31ef",
            r"\u31f0-\u31ff",
            r"\u3200-\u32ff",
            r"\u3300-\u33ff",
            r"\u3400-\u4dbf",
            r"\u4dc0-\u4dff",
            r"\u4e00-\u9fff",
        )
    ],  # fmt: skip
    (_DASHES, "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),  # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCTUATION, r" "),
    (r"\s+\.\s+", r" "),
]
# ... and after ftfy and HTML unescaping.
_AFTER_UNESCAPE = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]


def _substitute(caption: str, rules) -> str:
    for pattern, replacement in rules:
        caption = re.sub(pattern, replacement, caption)
    return caption


def clean_caption(caption: str) -> str:
    """One pass of the original's caption cleaning: URLs, HTML, handles, CJK, ids, file names and shop spam out;
    dashes and quotes normalised; lower case."""
    import ftfy
    from bs4 import BeautifulSoup

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _substitute(caption, _BEFORE_HTML)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _substitute(caption, _AFTER_HTML)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    return _substitute(caption, _AFTER_UNESCAPE).strip()


def preprocess_prompts(prompts: str | list[str], clean: bool) -> list[str]:
    """Prompts as T5 reads them in IF: cleaned twice (as the original does) or just lower-cased and stripped."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [clean_caption(clean_caption(p)) if clean else p.lower().strip() for p in prompts]
