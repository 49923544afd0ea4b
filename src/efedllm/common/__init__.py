"""What every layer shares and no peer negotiates: the error base, strict record validation, block
spans, supported dtypes and a background event loop. Nothing here imports another efedllm package."""
