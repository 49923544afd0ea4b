"""What every layer shares and no peer negotiates: the error base (``errors``), the strict record codec
(``records``), block spans (``spans``), supported dtypes (``dtypes``), peer-id checks (``peers``) and a
background event loop (``background``). Nothing here imports another efedllm package."""
