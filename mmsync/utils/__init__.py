from .ext_loader import check_ops_exist, load_ext

__all__ = ['check_ops_exist', 'load_ext']
