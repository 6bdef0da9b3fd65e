"""Does the model write Python that parses? Greedy completion of held-out function headers.

A header is a module-level ``def`` (its signature, and its docstring when that is at most
``MAX_DOCSTRING_LINES`` lines), prompted without its final newline. The completion is cut where
a line dedents back to column 0 (the function is over); a last line cut off by the token limit
is dropped. The header plus completion counts as a success when ``ast.parse`` accepts it (with
``pass`` appended when the body is still empty).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from engine.sampling_params import SamplingParams

MAX_DOCSTRING_LINES = 4


def function_headers(source: str, limit: int) -> list[str]:
    """Up to ``limit`` headers of ``source``'s module-level functions, in file order, each ending
    with a newline."""
    lines = source.splitlines(keepends=True)
    headers = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        first = node.body[0]
        end = first.lineno - 1  # the signature ends on the line before the body
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
            first.value.value, str)
        if has_doc and first.end_lineno - first.lineno < MAX_DOCSTRING_LINES:
            end = first.end_lineno
        elif first.lineno == node.lineno or not lines[end - 1].rstrip().endswith(":"):
            continue  # a one-line function, or a signature ending in a comment
        headers.append("".join(lines[node.lineno - 1 : end]))
        if len(headers) == limit:
            break
    return headers


def function_text(prompt: str, completion: str, truncated: bool) -> str:
    """``prompt`` + ``completion`` up to the function's end: the rest of the prompt's last line,
    then the body lines until one starts at column 0."""
    rest_of_line, newline, body_text = completion.partition("\n")
    header = prompt + rest_of_line + newline
    kept = []
    for line in body_text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    else:
        if truncated and kept and not kept[-1].endswith("\n"):
            kept.pop()
    body = "".join(kept)
    if not _has_statement(header, body):
        body = body.rstrip() + "\n    pass\n" if body.strip() else "    pass\n"
    return header + body


def _has_statement(header: str, body: str) -> bool:
    if not header.rstrip().endswith(":"):
        return True  # the header ends with its docstring, a statement
    return any(line.strip() and not line.strip().startswith("#") for line in body.splitlines())


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def complete_headers(llm, headers: Sequence[str], max_tokens: int = 96) -> list[str]:
    """Greedy completions of ``headers`` by ``llm`` (an ``engine.LLM``), cut to the function.
    The prompt leaves out the header's final newline: the tokenizer merges a newline with the
    next line's indentation, so a prompt ending in a bare newline asks for a column-0 line."""
    prompts = [h.removesuffix("\n") for h in headers]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [
        function_text(p, out.outputs[0].text, out.outputs[0].finish_reason == "length")
        for p, out in zip(prompts, outputs, strict=True)
    ]
