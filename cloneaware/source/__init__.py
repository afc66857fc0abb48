"""The source side of a backup: walking trees and mapping files."""
