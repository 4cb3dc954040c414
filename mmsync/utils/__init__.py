from .ext_loader import check_build_torch, check_ops_exist, load_ext

__all__ = ['check_build_torch', 'check_ops_exist', 'load_ext']
