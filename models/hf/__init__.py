"""The Hugging Face transformers wrapper of HybridLM: the remote-code files an exported folder carries
(`configuration_hybridnas.py`, `modeling_hybridnas.py`), so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` loads an exported candidate. They import the installed hybridnas package."""
